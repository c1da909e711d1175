"""``dpfl budget``: the (epsilon, delta) of a training plan under each accountant, the noise
multiplier for a target epsilon, and the paper's population extrapolation."""

from __future__ import annotations

import argparse
import json
import math
import time

from dpfl.cli.common import (
    _IMPORTED_AT,
    EXIT_NO_ANSWER,
    MAX_COUNT,
    CliError,
    _finite_float,
    _int_arg,
    _json_safe,
    _parse_int,
)


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
        help="target delta (default: a power of ten at least 10x below 1/(1000 x population), "
        "so that it stays below 1/K at every population the extrapolation shows, as dpfl "
        "simulate's default)",
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
    p.add_argument(
        "--clip-norm",
        type=_finite_float("--clip-norm"),
        help="C, to print the noise in absolute units too: C x sigma_DP (ml-pfl4asr's dp_sigma)",
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
    if args.clip_norm is not None and args.clip_norm <= 0:
        raise CliError(f"--clip-norm must be > 0, got {args.clip_norm:g}")
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
        "clip_norm": args.clip_norm,
        "dp_sigma": args.clip_norm * sigma_dp if args.clip_norm and sigma_dp else None,
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
    from dpfl.privacy.accounting import EXTRAPOLATION_SCALES, scaled_settings

    if cohort is None or population is None:
        raise CliError("--extrapolate needs --cohort and --population")
    out = []
    for token in tokens or [f"{x:g}" for x in EXTRAPOLATION_SCALES]:
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
                    if plan["clip_norm"]:
                        row["dp_sigma"] = plan["clip_norm"] * row["sigma_dp"]
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
        out += noise_conventions(plan["noise_multiplier"], plan["sigma_dp"], plan["clip_norm"])
        header = ["epsilon"]

        def cells(row: dict) -> tuple[list[str], str]:
            note = row.get("note") or ""
            if row.get("optimal_order") is not None and not note:
                note = f"optimal RDP order {row['optimal_order']:g}"
            return [_fmt_eps(row["epsilon"])], note
    else:
        out.append(f"  target:    epsilon = {target:g}")
        header = ["z", "sigma_DP"] + (["dp_sigma"] if plan["clip_norm"] else [])

        def cells(row: dict) -> tuple[list[str], str]:
            sigma = [f"{row[k]:.4g}" if k in row else "-" for k in ("sigma_dp", "dp_sigma")]
            values = [f"{row['noise_multiplier']:.6g}", *sigma[: len(header) - 1]]
            return values, row.get("note") or ""

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


def noise_conventions(z: float, sigma_dp: float | None, clip_norm: float | None) -> list[str]:
    """The noise in the three conventions a reader may bring: dpfl's z (std z*C on the sum), the
    paper's sigma_DP = z/S (std sigma_DP*C on the average), ml-pfl4asr's dp_sigma = C*sigma_DP."""
    lines = [f"  noise:     z = {z:.6g}: std z*C on the sum of clipped updates (dpfl)"]
    if sigma_dp:
        lines.append(
            f"             sigma_DP = z/S = {sigma_dp:.4g}: std sigma_DP*C on the average (the "
            "DP-FL-for-ASR paper)"
        )
        if clip_norm:
            lines.append(
                f"             dp_sigma = C*sigma_DP = {clip_norm * sigma_dp:.4g} with C = "
                f"{clip_norm:g} (ml-pfl4asr's config)"
            )
    return lines
