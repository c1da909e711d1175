"""``dpfl report`` and ``dpfl audit``."""

from __future__ import annotations

import argparse
import json

from dpfl.cli.common import (
    CliError,
    _finite_float,
    _int_arg,
)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="privacy statement and plots of finished runs",
        description="Print each run's privacy statement and write its plots (metrics.png: "
        "every evaluation metric, one panel each; epsilon.png: epsilon per round and the "
        "target) into its folder. With several runs, also plot their metric against the "
        "epsilon spent, one curve per run.",
    )
    p.add_argument("run_dir", nargs="+", help="run folder(s) (the run-dir of dpfl runs)")
    p.add_argument("--no-plots", action="store_true", help="print the statements only")
    p.add_argument(
        "--out",
        default="compare.png",
        help="with several runs: where to write the metric-against-epsilon plot "
        "(default: compare.png)",
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from dpfl.tools.report import report, write_comparison

    several = len(args.run_dir) > 1
    for k, run_dir in enumerate(args.run_dir):
        try:
            lines, paths = report(run_dir, plots=not args.no_plots)
        except ValueError as err:
            raise CliError(str(err)) from None
        if several:
            print(("\n" if k else "") + f"== {run_dir}")
        print("\n".join(lines))
        for path in paths:
            print(f"wrote {path}")
    if several and not args.no_plots:
        try:
            print(f"wrote {write_comparison(args.run_dir, args.out)}")
        except ValueError as err:
            raise CliError(str(err)) from None
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="empirical privacy audit: a canary attack's lower bound on epsilon",
        description="Run one round of dpfl's release path (client clipping, server check and "
        "sum, Gaussian noise) many times with and without a canary client whose update is a "
        "fixed large vector; report the 95% Clopper-Pearson lower bound on epsilon that the "
        "attack certifies, next to the accountant's epsilon. The canary is in every 'with' "
        "trial (not Poisson-sampled; the accountant is asked with q = 1, T = 1). Modes "
        "no-noise and no-clip break the mechanism on purpose to show a leak is detected.",
    )
    p.add_argument(
        "--trials",
        type=_int_arg("--trials"),
        default=10_000,
        help="trials per world, with and without the canary (default: 10000)",
    )
    p.add_argument(
        "--noise-multiplier",
        type=_finite_float("--noise-multiplier"),
        default=4.0,
        help="z of the audited mechanism (default: 4)",
    )
    p.add_argument(
        "--delta",
        type=_finite_float("--delta"),
        default=1e-5,
        help="delta of the claimed and the audited epsilon (default: 1e-5)",
    )
    p.add_argument(
        "--modes",
        default="correct,no-noise,no-clip",
        help="comma-separated mechanisms to audit: correct, and no-noise and no-clip (broken "
        "on purpose) (default: all three)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from dpfl.config import suggestion
    from dpfl.tools.audit import MODES, run_audit

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:  # every mode checked before any work
        hint = suggestion(unknown[0], MODES) if unknown else ""
        raise CliError(
            f"--modes: unknown {', '.join(unknown) or '(empty)'}; choose from "
            f"{', '.join(MODES)}{hint}"
        )
    results = []
    for mode in modes:
        try:
            r = run_audit(args.trials, args.noise_multiplier, mode, args.delta)
        except ValueError as err:
            raise CliError(str(err)) from None
        results.append(r)
        if not args.json:
            print(r.line(), flush=True)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    return 0


