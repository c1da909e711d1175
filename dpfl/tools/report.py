"""``dpfl report RUN_DIR``: the privacy statement of a finished run, and plots of it.

Reads the run folder written by the simulator or the Flower ServerApp (``config.json``,
``metrics.jsonl``, ``summary.json``) and prints what was guaranteed, under which assumptions, plus
the paper's extrapolation of epsilon to larger populations; writes ``metric.png`` and
``epsilon.png`` (and ``layers.png`` when diagnostics recorded per-layer ratios) next to the
data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dpfl.privacy.accounting import EXTRAPOLATION_SCALES, extrapolate, scaled_settings


def load_run(run_dir: str | Path) -> tuple[dict, list[dict], dict]:
    run = Path(run_dir)
    if not run.exists():
        raise ValueError(f"{run} does not exist: give a run folder (run-dir of a dpfl run)")
    if not run.is_dir():
        raise ValueError(f"{run} is a file, not a run folder (give the folder it is in)")
    try:
        config = json.loads((run / "config.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        metrics = [
            json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line
        ]
    except FileNotFoundError as err:
        raise ValueError(f"{run} is not a finished dpfl run: {err.filename} is missing") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{run}: unreadable run file: {err}") from None
    return config, metrics, summary


def _num(v: Any) -> float:
    """Run files store inf as the string "inf" (strict JSON); float() reads both."""
    return float(v)


def statement_lines(
    config: dict, summary: dict, scales: tuple[float, ...] = EXTRAPOLATION_SCALES
) -> list[str]:
    p = summary["privacy"]
    planned = p["rounds_planned"]
    extended = p.get("rounds_extended_from")
    lines = [
        f"run: {summary['rounds_run']} of {planned} rounds"
        + (
            f" (planned {extended[0]}, extended to "
            + ", then ".join(str(r) for r in [*extended[1:], planned])
            + ")"
            if extended
            else ""
        )
        + (
            " (stopped: the next round would exceed the target epsilon)"
            if summary.get("stopped_for_budget")
            else ""
        )
    ]
    metric = summary["metric"]
    initial, final = summary.get("initial"), summary.get("final")
    if initial and final and metric in initial and metric in final:
        lines.append(f"{metric}: {initial[metric]:.4f} before training, {final[metric]:.4f} after")
    elif final and metric in final:
        lines.append(f"{metric}: {final[metric]:.4f} after training")
    if not p["dp"]:
        lines.append(p["text"])
        return lines
    if p.get("noise_multiplier") == 0:
        lines.append(p["text"])
        return lines
    lines += [
        f"adjacency:  {p['adjacency']} (user-level DP)",
        f"sampling:   {p['sampling']}, q = {p['sample_rate']:.6g} "
        f"(expected cohort {p['expected_cohort']:g} of {p['population']:,} users)",
        *_mechanism_lines(p),
        f"noise:      {p['noise_source']}",
        *([f"cohorts:    {p['cohort_source']}"] if p.get("cohort_source") else []),
        *(
            [
                f"count:      min-replies decided on a noisy count, z_c = "
                f"{p['count_noise_multiplier']:.4g}; each attempt charged as one Gaussian "
                f"mechanism at z_eff = {p['charged_noise_multiplier']:.4g}"
            ]
            if p.get("count_noise_multiplier")
            else []
        ),
        f"delta:      {p['delta']:g}"
        + (f"  WARNING: {p['delta_warning']}" if p.get("delta_warning") else ""),
        *([f"trust:      {p['threat_model']}"] if p.get("threat_model") else []),
        *[f"assumes:    {a}" for a in p.get("assumptions", [])],
    ]
    if summary.get("evaluation_note"):
        lines.append(f"evaluation: NON-PRIVATE: {summary['evaluation_note']}")
    if "epsilon" not in p:
        lines.append(p["text"])
        return lines
    charged = p.get("rounds_charged", summary["rounds_run"])
    lines.append(
        f"epsilon (actual: the {charged} rounds charged at the sampling used"
        + (
            f", {charged - summary['rounds_run']} of them charged again"
            if charged > summary["rounds_run"]
            else ""
        )
        + "):"
    )
    for name, r in p["epsilon"].items():
        used = r["accountant"]
        how = f"under {used}" if used == name else f"under {used} ({name} requested)"
        note = f"; {r['note']}" if r.get("note") else ""
        lines.append(f"  {_num(r['epsilon']):.4g} {how}{note}")
    if p.get("distributed"):
        lines.append(
            "  (distributed DP: the Skellam rounds are accounted in RDP only; the extrapolation "
            "below is the Gaussian limit of the same noise)"
        )
    rounds = charged  # every charged attempt, as the actual epsilon counts them
    # sigma_DP of what each attempt is charged at (z_eff when a noisy count is released)
    sigma = p.get("charged_noise_multiplier", p["noise_multiplier"]) / p["expected_cohort"]
    if rounds > 0 and sigma > 0:
        settings = scaled_settings(p["expected_cohort"], p["population"], scales)
        rows = extrapolate(sigma, settings, rounds, p["delta"])
        same = (
            "same sigma_DP of z_eff (z and z_c scaled with the cohort)"
            if p.get("count_noise_multiplier")
            else "same sigma_DP"
        )
        lines.append(
            f"epsilon (extrapolated, not actual; rdp; {same}, T = {rounds} charged, "
            "delta; cohort and population scaled):"
        )
        for k, row in zip(scales, rows, strict=True):
            warn = (
                "  [delta >= 1/population: choose a smaller delta]"
                if (p["delta"] * row.population >= 1)
                else ""
            )
            lines.append(
                f"  x{k:g}: cohort {row.cohort:,.0f} of {row.population:,.0f} users -> "
                f"z = {row.noise_multiplier:.4g}, epsilon = {row.result.epsilon:.4g}{warn}"
            )
    return lines


def _epsilon_series(metrics: list[dict]) -> tuple[str, list[tuple[int, float]]]:
    """(accountant, [(round, epsilon)]): the configured accountant's where it was computed
    every round, else RDP's (computed every round)."""
    names = {k for m in metrics for k in m if k.startswith("epsilon_")}
    name = next((k for k in sorted(names) if k != "epsilon_rdp"), "epsilon_rdp")
    if name != "epsilon_rdp" and sum(name in m for m in metrics) < sum(
        "epsilon_rdp" in m for m in metrics
    ):
        name = "epsilon_rdp"
    points = [(m["round"], _num(m[name])) for m in metrics if name in m and not m.get("retry")]
    return name.removeprefix("epsilon_"), points


def _series(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [
        (m["round"], _num(m[key]))
        for m in metrics
        if key in m and not m.get("retry") and math.isfinite(_num(m[key]))
    ]


def panel_keys(metrics: list[dict], metric: str) -> list[str]:
    """The series ``metrics.png`` shows, one panel each: every evaluation metric (the main one
    first; loss included), then the clients' mean training loss when diagnostics recorded it."""
    keys = sorted(
        {k for m in metrics for k in m if k.startswith("eval_") and k != "eval_non_private"},
        key=lambda k: (k != f"eval_{metric}", k),
    )
    if any("diag_train_loss" in m for m in metrics):
        keys.append("diag_train_loss")
    return [k for k in keys if _series(metrics, k)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    run_dir: str | Path, metrics: list[dict], metric: str, target_epsilon: float = 0.0
) -> list[Path]:
    """``metrics.png``: one panel per evaluation metric (the main one first, loss included) and
    the clients' mean training loss when diagnostics recorded it; ``epsilon.png``: epsilon per
    round, with the target as a line."""
    plt = _pyplot()
    run = Path(run_dir)
    out = []
    panels = [(k, _series(metrics, k)) for k in panel_keys(metrics, metric)]
    if panels:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, (key, pts) in zip(axes.flat, panels, strict=False):
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3)
            ax.set_xlabel("round")
            if key == "diag_train_loss":
                ax.set_title("clients' training loss (non-private diagnostic)", fontsize=9)
            else:
                ax.set_title(key.removeprefix("eval_"), fontsize=10)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        private = any(m.get("eval_non_private") for m in metrics)
        fig.suptitle(
            "evaluation with per-user private state or users' data: NON-PRIVATE diagnostics"
            if private
            else "evaluation of the global model",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(run / "metrics.png", dpi=100)
        plt.close(fig)
        out.append(run / "metrics.png")
    name, eps = _epsilon_series(metrics)
    finite = [(r, e) for r, e in eps if math.isfinite(e)]
    if finite:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*finite, strict=True), marker="o", markersize=3, color="tab:red")
        if target_epsilon > 0:
            ax.axhline(target_epsilon, color="black", linestyle="--", linewidth=1)
            ax.annotate(
                f"target {target_epsilon:g}",
                (finite[0][0], target_epsilon),
                textcoords="offset points",
                xytext=(2, 3),
                fontsize=8,
            )
            ax.set_ylim(0, max(target_epsilon, max(e for _, e in finite)) * 1.1)
        ax.set_xlabel("round")
        ax.set_ylabel(f"epsilon ({name})")
        ax.set_title("privacy spent")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run / "epsilon.png", dpi=100)
        plt.close(fig)
        out.append(run / "epsilon.png")
    layers = write_layer_plot(plt, run, metrics)
    return out + ([layers] if layers else [])


def write_layer_plot(plt, run: Path, metrics: list[dict]) -> Path | None:
    """``layers.png``: the per-layer ratios r_h (norm share / dimension share) per round, median
    and 5-95 % band over tensors and clients, when diagnostics recorded them."""
    mid = _series(metrics, "diag_layer_ratio_median")
    if not mid:
        return None
    lo = dict(_series(metrics, "diag_layer_ratio_p05"))
    hi = dict(_series(metrics, "diag_layer_ratio_p95"))
    rounds = [r for r, _ in mid if r in lo and r in hi]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.fill_between(rounds, [lo[r] for r in rounds], [hi[r] for r in rounds], alpha=0.25,
                    label="5-95 % over tensors and clients")  # fmt: skip
    ax.plot(*zip(*mid, strict=True), marker="o", markersize=3, label="median")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("r_h = (|d_h| / |d|) / sqrt(d_h / d)")
    last = next((m for m in reversed(metrics) if "diag_layer_ratio_lowest" in m), None)
    if last:
        lowest = list(last["diag_layer_ratio_lowest"].items())[:3]
        low = ", ".join(f"{k} {v:.3g}" for k, v in lowest)
        ax.text(0.01, 0.02, f"lowest (round {last['round']}): {low}", transform=ax.transAxes,
                fontsize=7)  # fmt: skip
    ax.set_title("per-layer norm share vs dimension share (NON-PRIVATE diagnostic)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "layers.png", dpi=100)
    plt.close(fig)
    return run / "layers.png"


def layer_lines(metrics: list[dict]) -> list[str]:
    """The last recorded per-layer ratios, in words (empty without diagnostics)."""
    last = next((m for m in reversed(metrics) if "diag_layer_ratio_median" in m), None)
    if last is None:
        return []

    def named(key: str) -> str:
        return ", ".join(f"{k} {v:.3g}" for k, v in last.get(key, {}).items())

    return [
        f"per-layer ratios r_h = norm share / dimension share (NON-PRIVATE diagnostic, round "
        f"{last['round']}): median {last['diag_layer_ratio_median']:.3g}, 5-95 % "
        f"{last['diag_layer_ratio_p05']:.3g} to {last['diag_layer_ratio_p95']:.3g}",
        f"  lowest:  {named('diag_layer_ratio_lowest')}",
        f"  highest: {named('diag_layer_ratio_highest')}",
    ]


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """The picture users of DP want most: each run's metric against the epsilon it had spent,
    one curve per run (its evaluation rounds), the last point marked. A run without noise
    (epsilon = inf) is a horizontal line at its final metric."""
    plt = _pyplot()
    runs = [(Path(d), *load_run(d)) for d in run_dirs]
    metrics_named = {summary["metric"] for _, _, _, summary in runs}
    if len(metrics_named) > 1:
        raise ValueError(
            "the runs report different metrics (" + ", ".join(sorted(metrics_named)) + "): "
            "compare runs of one task"
        )
    metric = metrics_named.pop()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    flat = []
    for run, _config, metrics, summary in runs:
        name, eps = _epsilon_series(metrics)
        eps_at = dict(eps)
        pts = [(eps_at[r], v) for r, v in _series(metrics, f"eval_{metric}") if r in eps_at]
        finite = [(e, v) for e, v in pts if math.isfinite(e)]
        label = f"{run.name} ({name})"
        if finite:
            (line,) = ax.plot(*zip(*finite, strict=True), marker="o", markersize=3, label=label)
            ax.plot(*finite[-1], marker="*", markersize=12, color=line.get_color())
        elif summary.get("final") and metric in summary["final"]:
            flat.append((run.name, summary["final"][metric]))
    for name, value in flat:
        ax.axhline(value, linestyle=":", color="gray")
        ax.annotate(
            f"{name}: no noise (epsilon = inf)",
            (0, value),
            fontsize=8,
            xycoords=("axes fraction", "data"),
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against privacy spent (star: end of run)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report(run_dir: str | Path, plots: bool = True) -> tuple[list[str], list[Path]]:
    config, metrics, summary = load_run(run_dir)
    lines = statement_lines(config, summary) + layer_lines(metrics)
    target = float(config.get("config", {}).get("target-epsilon", 0) or 0)
    paths = write_plots(run_dir, metrics, summary["metric"], target) if plots else []
    return lines, paths


def _mechanism_lines(p: dict) -> list[str]:
    clip = (
        f"clip {p['clip_scheme']}/{p['clip_mode']} C = {p['clip_norm']:g} on the "
        f"{p['clip_location']}"
    )
    d = p.get("distributed")
    if d:
        return [
            f"mechanism:  {clip}; distributed DP: each client adds Skellam noise to a "
            f"{d['sum_bits']}-bit encoding (scale {d['scale']:.4g}, {d['padded_dim']:,} "
            f"coordinates after the rotation); z = {p['noise_multiplier']:.4g} of the integer "
            f"L2 sensitivity {d['l2_sensitivity_integer']:.4g} from at least "
            f"{d['min_contributors']} contributions",
            f"            wrap bound {d['wrap_probability_per_round']:g} per round (cohorts up "
            f"to {d['largest_cohort_covered']}); a round with fewer than "
            f"{d['min_contributors']} contributions is not released (probability "
            f"{d['released_below_threshold_probability']:.2g}); against the server, which knows "
            f"the cohort: epsilon {d['epsilon_per_round_unsampled']:.4g} per round taken part in",
            f"client:     {d['moved_to_the_client']}",
            f"server:     {d['kept_by_the_server']}",
            f"adjacency:  {d['adjacency']}",
            f"limits:     {d['known_limits']}",
        ]
    return [
        f"mechanism:  {clip}; Gaussian noise z = {p['noise_multiplier']:.4g} on the sum "
        f"(sigma_DP = {p['sigma_dp']:.3g} on the average)",
        f"            the same noise as the paper's sigma_DP = z/S = {p['sigma_dp']:.4g} (std "
        f"sigma_DP*C on the average) and ml-pfl4asr's dp_sigma = C*sigma_DP = "
        f"{p['clip_norm'] * p['sigma_dp']:.4g}",
    ]
