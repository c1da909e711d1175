"""The ``dpfl`` command.

Subcommands:

* ``dpfl budget``: the (epsilon, delta) of a DP-FL training plan under each accountant, the noise
  multiplier for a target epsilon, and the paper's population extrapolation.

Errors in the input end the command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence

_IMPORTED_AT = time.perf_counter()

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_NO_ANSWER = 1  # every requested accountant refused or failed
MAX_COUNT = 10**15  # rounds, cohorts and populations beyond this are typos, not plans


class CliError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise CliError(f"{self.prog}: error: {message}")

    def subcommand(self, name: str | None) -> _Parser:
        """The parser of subcommand ``name`` (this one if there is none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return self

    def suggest(self, words: list[str]) -> str:
        """'; did you mean --x?' for mistyped flags, from this command's own flags."""
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for word in words:
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=3, cutoff=0.6)
                if close:
                    names = (
                        close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
                    )
                    hints.append(f"{word}: did you mean {names}?")
        return ("; " + "; ".join(hints)) if hints else f" (see {self.prog} --help)"


def _add_verbosity(p: argparse.ArgumentParser, quiet_help: str) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also print debug messages of dpfl's modules"
    )


def _setup_logging(args: argparse.Namespace) -> None:
    """dpfl's own messages (why vectorisation fell back, resumes, budget stops) on stderr:
    INFO by default, WARNING with --quiet, DEBUG with -v. Other libraries' INFO stays off."""
    level = logging.INFO
    if getattr(args, "quiet", False):
        level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    logger = logging.getLogger("dpfl")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname).1s dpfl: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be replaced after set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _finite_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        return value

    return parse


def _parse_int(text: str) -> int:
    """An integer, allowing thousands separators (1,024 or 1_024)."""
    return int(text.strip().replace(",", "").replace("_", ""))


def _int_arg(name: str):
    def parse(text: str) -> int:
        try:
            value = _parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if abs(value) > MAX_COUNT:
            shown = text if len(text) <= 24 else text[:20] + "..."
            raise argparse.ArgumentTypeError(f"{name} must be at most {MAX_COUNT:.0e}, got {shown}")
        return value

    return parse


def _add_budget(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "budget",
        help="report the privacy budget of a training plan",
        description=(
            "Report (epsilon, delta) for T rounds of DP-FedAvg: Poisson sampling of users with "
            "rate q, per-user updates clipped to C, Gaussian noise of std z*C on their sum. "
            "Adjacency: add/remove one user."
        ),
    )
    noise = p.add_argument_group("noise (one of)").add_mutually_exclusive_group(required=True)
    noise.add_argument(
        "--noise-multiplier",
        "-z",
        type=_finite_float("--noise-multiplier"),
        help="z: noise std on the sum of clipped updates, in units of C",
    )
    noise.add_argument(
        "--sigma-dp",
        type=_finite_float("--sigma-dp"),
        help="paper convention: noise std on the average, in units of C "
        "(z = sigma_DP x cohort); needs --cohort-size",
    )
    noise.add_argument(
        "--target-epsilon",
        type=_finite_float("--target-epsilon"),
        help="instead of epsilon, print the noise multiplier that reaches this epsilon",
    )
    sampling = p.add_argument_group(
        "sampling (--sample-rate, or --cohort-size and --population)"
    )
    sampling.add_argument(
        "--sample-rate",
        "-q",
        type=_finite_float("--sample-rate"),
        help="probability that a user takes part in a round",
    )
    sampling.add_argument(
        "--cohort-size",
        "--cohort",
        "-S",
        dest="cohort",
        type=_int_arg("--cohort-size"),
        help="expected number of users per round (the config key cohort-size; --cohort is an "
        "older spelling)",
    )
    sampling.add_argument(
        "--population", "-K", type=_int_arg("--population"), help="number of users"
    )
    p.add_argument(
        "--rounds", "-T", type=_int_arg("--rounds"), required=True, help="number of rounds T"
    )
    p.add_argument(
        "--delta",
        type=_finite_float("--delta"),
        help="target delta (default: a power of ten at least 10x below 1/population)",
    )
    p.add_argument(
        "--accountants",
        default="rdp,prv,pld",
        help="comma-separated subset of rdp,prv,pld (default: all three)",
    )
    p.add_argument(
        "--extrapolate",
        nargs="*",
        metavar="SCALE|S:K",
        help="epsilon at larger populations, keeping sigma_DP and T: a number scales "
        "cohort and population together, S:K sets them (default: 10 100 1000)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_budget)


def _resolve_budget(args: argparse.Namespace) -> dict:
    from dpfl.privacy.accounting import ACCOUNTANTS, default_delta
    from dpfl.privacy.mechanisms import noise_multiplier_from_sigma_dp

    if args.rounds < 1:
        raise CliError(f"--rounds must be >= 1, got {args.rounds}")
    cohort, population = args.cohort, args.population
    if cohort is not None and cohort < 1:
        raise CliError(f"--cohort-size must be >= 1, got {cohort}")
    if population is not None and population < 1:
        raise CliError(f"--population must be >= 1, got {population}")
    if args.sample_rate is not None:
        if cohort is not None and population is not None:
            raise CliError("give --sample-rate or --cohort-size/--population, not both")
        q = args.sample_rate
    elif cohort is not None and population is not None:
        if cohort > population:
            raise CliError(f"--cohort-size ({cohort}) cannot exceed --population ({population})")
        q = cohort / population
    else:
        raise CliError("give --sample-rate, or both --cohort-size and --population")
    if not 0 < q <= 1:
        raise CliError(f"--sample-rate must be in (0, 1], got {q:g}")
    if population is not None and cohort is None:
        cohort = q * population  # expected cohort size
    if args.delta is not None:
        delta = args.delta
    elif population is not None:
        delta = default_delta(population)
    else:
        raise CliError("--delta is required when --population is not given")
    if not 0 < delta < 1:
        raise CliError(f"--delta must be in (0, 1), got {delta:g}")
    z = args.noise_multiplier
    sigma_dp = args.sigma_dp
    if z is not None and z < 0:
        raise CliError(f"--noise-multiplier must be >= 0, got {z:g}")
    if sigma_dp is not None:
        if sigma_dp <= 0:
            raise CliError(f"--sigma-dp must be > 0, got {sigma_dp:g}")
        if cohort is None:
            raise CliError("--sigma-dp needs --cohort-size (z = sigma_DP x cohort)")
        z = noise_multiplier_from_sigma_dp(sigma_dp, cohort)
    elif z is not None and cohort is not None:
        sigma_dp = z / cohort
    if args.target_epsilon is not None and args.target_epsilon <= 0:
        raise CliError(f"--target-epsilon must be > 0, got {args.target_epsilon:g}")
    accountants = list(dict.fromkeys(a.strip() for a in args.accountants.split(",") if a.strip()))
    unknown = [a for a in accountants if a not in ACCOUNTANTS]
    if unknown or not accountants:
        raise CliError(
            f"--accountants: unknown {', '.join(unknown) or '(empty)'}; "
            f"choose from {', '.join(ACCOUNTANTS)}"
        )
    warning = None
    if population is not None and delta * population >= 1:
        warning = (
            f"delta = {delta:g} >= 1/population (1/{population:,}): such a delta permits "
            "releasing a whole user's data, and epsilon then means nothing; use delta < "
            f"1/population (e.g. {default_delta(population):g})"
        )
    elif population is None and delta >= 0.01:
        warning = f"delta = {delta:g} is large: it must be well below 1/population"
    return {
        "delta_warning": warning,
        "noise_multiplier": z,
        "sigma_dp": sigma_dp,
        "sample_rate": q,
        "cohort": cohort,
        "population": population,
        "rounds": args.rounds,
        "delta": delta,
        "accountants": accountants,
    }


def _extrapolation_settings(
    tokens: list[str], cohort: float | None, population: int | None
) -> list[tuple[str, float, float]]:
    from dpfl.privacy.accounting import scaled_settings

    if cohort is None or population is None:
        raise CliError("--extrapolate needs --cohort and --population")
    out = []
    for token in tokens or ["10", "100", "1000"]:
        if ":" in token:
            s_text, k_text = token.split(":", 1)
            try:
                s, k = _parse_int(s_text), _parse_int(k_text)
            except ValueError:
                raise CliError(f"--extrapolate: {token!r} is not COHORT:POPULATION") from None
            label = f"{s / cohort:.4g}:{k / population:.4g}"
        else:
            try:
                ((s, k),) = scaled_settings(cohort, population, [float(token)])
            except ValueError:
                raise CliError(
                    f"--extrapolate: {token!r} is neither a finite scale > 0 nor COHORT:POPULATION"
                ) from None
            label = token
        if not (1 <= s <= k <= MAX_COUNT):
            raise CliError(
                f"--extrapolate {token}: need 1 <= cohort <= population <= {MAX_COUNT:.0e}, "
                f"got cohort {s:.4g}, population {k:.4g}"
            )
        out.append((label, s, k))
    return out


def _fmt_count(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


def _fmt_eps(eps: float) -> str:
    if math.isinf(eps):
        return "inf"
    return f"{eps:.4g}" if eps < 1e5 else f"{eps:.3e}"


def _cmd_budget(args: argparse.Namespace) -> int:
    from dpfl.privacy.accounting import (
        ADJACENCY,
        SAMPLING,
        AccountantRangeError,
        calibrate_noise_multiplier,
        compute_epsilon,
        extrapolate,
        slack_note,
    )

    plan = _resolve_budget(args)
    settings = None
    if args.extrapolate is not None:
        if args.target_epsilon is not None:
            raise CliError(
                "--extrapolate reports epsilon; it cannot be combined with --target-epsilon"
            )
        settings = _extrapolation_settings(args.extrapolate, plan["cohort"], plan["population"])
    q, T, delta = plan["sample_rate"], plan["rounds"], plan["delta"]
    report: dict = {
        "plan": {k: v for k, v in plan.items() if k not in ("accountants", "delta_warning")},
        **({"warning": plan["delta_warning"]} if plan["delta_warning"] else {}),
        "assumptions": {
            "adjacency": ADJACENCY,
            "sampling": SAMPLING,
            "delta": delta,
            "noise": "Gaussian, std z*C on every coordinate of the sum of clipped updates",
        },
        "accountants": [],
    }
    import dp_accounting.pld  # noqa: F401
    import opacus.accountants  # noqa: F401  (imports torch: most of the start-up time)

    started = time.perf_counter()
    report["startup_seconds"] = started - _IMPORTED_AT
    for name in plan["accountants"]:
        row: dict = {"accountant": name}
        t0 = time.perf_counter()
        try:
            if args.target_epsilon is not None:
                z = calibrate_noise_multiplier(args.target_epsilon, delta, q, T, name)
                row["noise_multiplier"] = z
                slack = slack_note(name, args.target_epsilon)
                if slack:
                    row["note"] = slack
                if plan["cohort"] is not None:
                    row["sigma_dp"] = z / plan["cohort"]
            else:
                result = compute_epsilon(plan["noise_multiplier"], q, T, delta, name)
                row["epsilon"] = result.epsilon
                row["note"] = result.note
                if result.optimal_order is not None:
                    row["optimal_order"] = result.optimal_order
        except AccountantRangeError as err:
            row["refused"] = str(err)
        except ValueError as err:
            if args.target_epsilon is not None:  # the target is out of the search range
                raise CliError(str(err)) from None
            row["refused"] = f"{name} failed: {err}"
        except ArithmeticError as err:
            row["refused"] = f"{name} failed: {type(err).__name__}: {err}"
        row["seconds"] = time.perf_counter() - t0
        if plan["delta_warning"] and "refused" not in row:
            flag = "WARNING: " + ("delta >= 1/population" if plan["population"] else "large delta")
            row["note"] = f"{row['note']}; {flag}" if row.get("note") else flag
        report["accountants"].append(row)
    if settings is not None:
        sigma_dp = plan["sigma_dp"]
        if not sigma_dp:
            raise CliError("--extrapolate needs a non-zero noise")
        try:
            rows = extrapolate(sigma_dp, [(s, k) for _, s, k in settings], T, delta, "rdp")
        except (ValueError, ArithmeticError) as err:
            raise CliError(f"--extrapolate: {err}") from None
        report["extrapolation"] = {
            "accountant": "rdp",
            "keeps": {"sigma_dp": sigma_dp, "rounds": T, "delta": delta},
            "rows": [
                {
                    "scale": label,
                    "cohort": r.cohort,
                    "population": r.population,
                    "sample_rate": r.sample_rate,
                    "noise_multiplier": r.noise_multiplier,
                    "epsilon": r.result.epsilon,
                    "note": r.result.note,
                }
                for (label, _, _), r in zip(settings, rows, strict=True)
            ],
        }
    report["seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    else:
        _print_budget(report, args.target_epsilon)
    if all("refused" in row for row in report["accountants"]):
        return EXIT_NO_ANSWER
    return 0


def _json_safe(value):
    """inf/NaN as strings: strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _print_budget(report: dict, target: float | None) -> None:
    plan = report["plan"]
    out = []
    out.append("dpfl budget: user-level DP for DP-FedAvg")
    out.append(f"  adjacency: {report['assumptions']['adjacency']}")
    out.append(f"  sampling:  {report['assumptions']['sampling']}")
    if plan["cohort"] is not None and plan["population"] is not None:
        rate = (
            f"q = {plan['sample_rate']:.6g} (expected cohort {_fmt_count(plan['cohort'])} of "
            f"population {plan['population']:,})"
        )
    else:
        rate = f"q = {plan['sample_rate']:.6g}"
    out.append(f"  plan:      {rate}, T = {plan['rounds']} rounds, delta = {plan['delta']:g}")
    if report.get("warning"):
        out.append(f"  WARNING:   {report['warning']}")
    if target is None:
        z = plan["noise_multiplier"]
        extra = f" (sigma_DP = {plan['sigma_dp']:.4g} on the average)" if plan["sigma_dp"] else ""
        out.append(f"  noise:     z = {z:.6g}{extra}")
        header = ["epsilon"]

        def cells(row: dict) -> tuple[list[str], str]:
            note = row.get("note") or ""
            if row.get("optimal_order") is not None and not note:
                note = f"optimal RDP order {row['optimal_order']:g}"
            return [_fmt_eps(row["epsilon"])], note
    else:
        out.append(f"  target:    epsilon = {target:g}")
        header = ["z", "sigma_DP"]

        def cells(row: dict) -> tuple[list[str], str]:
            sigma = f"{row['sigma_dp']:.4g}" if "sigma_dp" in row else "-"
            return [f"{row['noise_multiplier']:.6g}", sigma], row.get("note") or ""

    out.append("")
    out.append(f"  {'accountant':<11}" + "".join(f"{h:>12}" for h in header) + "   note")
    for row in report["accountants"]:
        if "refused" in row:
            values, note = ["refused"] + [""] * (len(header) - 1), row["refused"]
        else:
            values, note = cells(row)
        line = f"  {row['accountant']:<11}" + "".join(f"{v:>12}" for v in values) + f"   {note}"
        out.append(line.rstrip())
    ext = report.get("extrapolation")
    if ext:
        keeps = ext["keeps"]
        out.append("")
        out.append(
            f"  extrapolation ({ext['accountant']}, the fastest accountant): keeps sigma_DP = "
            f"{keeps['sigma_dp']:.4g}, T = {keeps['rounds']}, delta = {keeps['delta']:g}; "
            "z = sigma_DP x S, q = S/K"
        )
        out.append(
            f"  {'scale':>10}{'cohort S':>12}{'population K':>15}{'q':>11}{'z':>10}{'epsilon':>12}"
        )
        for r in ext["rows"]:
            out.append(
                f"  {r['scale']:>10}{_fmt_count(r['cohort']):>12}{_fmt_count(r['population']):>15}"
                f"{r['sample_rate']:>11.4g}{r['noise_multiplier']:>10.4g}"
                f"{_fmt_eps(r['epsilon']):>12}"
            )
    out.append("")
    out.append(
        f"  computed in {report['seconds']:.2f} s "
        f"(after {report['startup_seconds']:.2f} s of start-up, mostly importing torch and Opacus)"
    )
    print("\n".join(out))


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="train with DP-FedAvg in dpfl's in-process simulator",
        description=(
            "Run federated training with user-level DP in process. Every config key is a flag; "
            "--config reads a TOML file of the same keys (flags override it)."
        ),
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's checkpoint (a larger --rounds extends a finished "
        "run; any other changed key is refused)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the run folder holds (without it, such a folder is refused)",
    )
    _add_verbosity(p, "no progress bar, only warnings")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print a per-round time breakdown (data, local training, clipping, aggregation, "
        "noise, server step, accounting, evaluation, metrics) at the end",
    )
    _add_config_keys(p)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from dpfl.profiling import profiled
    from dpfl.simulation import simulate
    from dpfl.tools.report import statement_lines

    cfg = _config_from_args(args)
    if args.resume and args.overwrite:
        raise CliError("--resume continues the run in the folder, --overwrite replaces it: one")
    with profiled() if args.profile else nullcontext() as profile:
        try:
            summary = simulate(
                cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet
            )
        except KeyboardInterrupt:
            raise Interrupted(_checkpoint_line(cfg)) from None
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            raise CliError(str(err)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # another rank of a torchrun job: rank 0 reports
    print("\n".join(statement_lines({"config": cfg.to_dict()}, summary)))
    print(f"run folder: {cfg.run_dir} (dpfl report {cfg.run_dir} for plots)")
    if profile is not None:
        print("\nper-round time breakdown (round 1 apart: warm-up):")
        print(profile.table())
    return 0


class Interrupted(Exception):
    """Ctrl-C: one line saying what is left, exit status 130."""


def _checkpoint_line(cfg) -> str:
    """Where an interrupted run can continue from (or that it cannot)."""
    from pathlib import Path

    from dpfl.server.round import load_checkpoint

    path = Path(cfg.run_dir) / "checkpoint.pt"
    try:
        done = load_checkpoint(path)["server"]["round"]
    except (ValueError, KeyError, OSError):
        how = (
            "no checkpoint was written yet"
            if cfg.checkpoint_every
            else "no checkpoint (checkpoint-every = 0)"
        )
        return f"interrupted: {how}; the run in {cfg.run_dir} cannot be resumed"
    return (
        f"interrupted: last checkpoint {path} (round {done}); continue with the same command "
        "and --resume"
    )


def _config_from_args(args: argparse.Namespace):
    from dpfl.config import RunConfig

    # A task or data given by import path is looked up as `python -m` would: from the working
    # folder, and from the config file's folder (a console script has neither on sys.path).
    folders = [os.getcwd()]
    if getattr(args, "config", None):
        folders.append(os.path.dirname(os.path.abspath(args.config)))
    for folder in folders:
        if folder not in sys.path:
            sys.path.insert(0, folder)

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("key:") and v is not None}
    overrides.update(getattr(args, "task_options", {}))
    try:
        base = RunConfig.from_toml(args.config) if args.config else None
        return RunConfig.from_mapping(overrides, base)
    except ValueError as err:
        raise CliError(str(err)) from None


def _task_options(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--task-options.KEY VALUE`` (or ``=VALUE``) pairs among unparsed words, and the rest.
    A value is read as a TOML scalar (``0.1``, ``3``, ``true``), else kept as a string, so it
    has the type it would have in a TOML file or Flower's run config."""
    import tomllib

    from dpfl.config import OPTIONS

    def scalar(text: str):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text

    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith(f"--{OPTIONS}."):
            key, eq, value = word[2:].partition("=")
            if not eq:
                if i + 1 >= len(words):
                    raise CliError(f"{word} needs a value")
                value = words[i + 1]
                i += 1
            found[key] = scalar(value)
        else:
            rest.append(word)
        i += 1
    return found, rest


def _add_config_keys(p: argparse.ArgumentParser) -> None:
    from dpfl.config import RunConfig

    p.add_argument(
        "--config",
        help="TOML file of config keys (flags override it); --task-options.KEY VALUE sets a "
        "key of its [task-options] table (keyword arguments of a task or data factory)",
    )
    keys = p.add_argument_group("config keys")
    aliases = {"client-optimizer": ["--optimizer"]}  # short forms of common keys
    for key, default, doc in RunConfig.describe_defaults():
        keys.add_argument(
            f"--{key}",
            *aliases.get(key, []),
            metavar="V",
            dest=f"key:{key}",
            help=f"{doc} (default: {default})",
        )


def _add_central(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "central",
        help="train a speech seed model centrally on the seed speakers",
        description="Train on the first seed-speakers speakers (pooled, Adam, central-steps "
        "steps) and write run-dir/model.pt, to start a federated run from (init-model).",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the run folder holds (without it, such a folder is refused)",
    )
    _add_verbosity(p, "no progress bar, only warnings")
    _add_config_keys(p)
    p.set_defaults(func=_cmd_central)


def _cmd_central(args: argparse.Namespace) -> int:
    from dpfl.recipes.asr.central import train_central

    cfg = _config_from_args(args)
    try:
        summary = train_central(cfg, progress=not args.quiet, overwrite=args.overwrite)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: the seed model in {cfg.run_dir} was not written") from None
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise CliError(str(err)) from None
    m = summary["metric"]
    print(
        f"seed model: {summary['speakers']} speakers, {summary['hours']:.2f} h, "
        f"{summary['steps']} steps; {m} {summary['initial'][m]:.4f} -> {summary['final'][m]:.4f}"
        f", cer {summary['final'].get('cer', float('nan')):.4f}"
    )
    print(f"model: {cfg.run_dir}/model.pt (start a federated run with --init-model)")
    return 0


def _add_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "speech-corpus",
        help="synthesise a multi-speaker speech corpus offline with espeak-ng",
    )
    p.add_argument("out_dir", help="folder to write the corpus to (kept if already complete)")
    p.add_argument(
        "--synthetic-speakers",
        "--speakers",
        dest="speakers",
        type=_int_arg("--synthetic-speakers"),
        default=40,
        help="training speakers, one espeak-ng voice each (default: 40; --speakers is an older "
        "spelling)",
    )
    p.add_argument(
        "--synthetic-utterances",
        "--utterances",
        dest="utterances",
        type=_int_arg("--synthetic-utterances"),
        default=10,
        help="utterances per speaker (default: 10; also --utterances)",
    )
    p.add_argument(
        "--synthetic-test-speakers",
        "--test-speakers",
        dest="test_speakers",
        type=_int_arg("--synthetic-test-speakers"),
        default=8,
        help="further speakers for the test split (default: 8; also --test-speakers)",
    )
    p.add_argument(
        "--layout",
        choices=("librispeech", "commonvoice"),
        default="librispeech",
        help="librispeech: train/ and test/ subset folders of FLAC and .trans.txt; commonvoice: "
        "clips/*.mp3 with train.tsv and test.tsv (default: librispeech)",
    )
    p.add_argument(
        "--seed",
        type=_int_arg("--seed"),
        default=0,
        help="seed of the voices and sentences (default: 0)",
    )
    p.set_defaults(func=_cmd_corpus)


def _cmd_corpus(args: argparse.Namespace) -> int:
    from dpfl.recipes.asr.synth import generate_corpus

    try:
        out = generate_corpus(
            args.out_dir,
            args.speakers,
            args.utterances,
            args.test_speakers,
            args.seed,
            args.layout,
        )
    except (ValueError, RuntimeError) as err:
        raise CliError(str(err)) from None
    print(
        f"wrote a {args.layout} corpus of {args.speakers} + {args.test_speakers} speakers to {out}"
    )
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpfl", description=__doc__.splitlines()[0])
    from importlib.metadata import version

    parser.add_argument("--version", action="version", version=f"dpfl {version('dpfl')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_budget(sub)
    _add_simulate(sub)
    _add_central(sub)
    _add_corpus(sub)
    _add_report(sub)
    _add_audit(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if hasattr(args, "config") and unknown:
            args.task_options, unknown = _task_options(unknown)
        if unknown:
            sub = parser.subcommand(getattr(args, "command", None))
            sub.error(f"unrecognized arguments: {' '.join(unknown)}{sub.suggest(unknown)}")
        _setup_logging(args)
        return args.func(args)
    except (Interrupted, KeyboardInterrupt) as err:
        print(str(err) or "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CliError as err:
        message = " ".join(str(err).split()) or "invalid input"
        if not message.startswith("dpfl"):
            message = f"dpfl: error: {message}"
        print(message, file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
