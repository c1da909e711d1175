"""``dpfl report RUN_DIR``: the privacy statement of a finished run, and plots of it.

Reads the run folder written by the simulator or the Flower ServerApp (``config.json``,
``metrics.jsonl``, ``summary.json``) and prints what was guaranteed, under which assumptions, plus
the paper's extrapolation of epsilon to larger populations; writes ``metric.png`` and
``epsilon.png`` next to the data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dpfl.privacy.accounting import extrapolate, scaled_settings


def load_run(run_dir: str | Path) -> tuple[dict, list[dict], dict]:
    run = Path(run_dir)
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
    config: dict, summary: dict, scales: tuple[float, ...] = (10, 100, 1000)
) -> list[str]:
    p = summary["privacy"]
    lines = [f"run: {summary['rounds_run']} of {p['rounds_planned']} rounds"]
    metric = summary["metric"]
    if summary.get("initial") and summary.get("final"):
        lines.append(
            f"{metric}: {summary['initial'][metric]:.4f} before training, "
            f"{summary['final'][metric]:.4f} after"
        )
    if not p["dp"]:
        lines.append(p["text"])
        return lines
    lines += [
        f"adjacency:  {p['adjacency']} (user-level DP)",
        f"sampling:   {p['sampling']}, q = {p['sample_rate']:.6g} "
        f"(expected cohort {p['expected_cohort']:g} of {p['population']:,} users)",
        f"mechanism:  clip {p['clip_scheme']}/{p['clip_mode']} C = {p['clip_norm']:g} on the "
        f"{p['clip_location']}; Gaussian noise z = {p['noise_multiplier']:.4g} on the sum "
        f"(sigma_DP = {p['sigma_dp']:.3g} on the average)",
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
        f"delta:      {p['delta']:g}",
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


def write_plots(run_dir: str | Path, metrics: list[dict], metric: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    out = []
    key = f"eval_{metric}"
    points = [(m["round"], m[key]) for m in metrics if key in m]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} of the global model")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run / "metric.png", dpi=100)
        plt.close(fig)
        out.append(run / "metric.png")
    names = {k for m in metrics for k in m if k.startswith("epsilon_")}
    # the configured accountant's where it was computed each round, else RDP's
    name = next((k for k in sorted(names) if k != "epsilon_rdp"), "epsilon_rdp")
    if name != "epsilon_rdp" and sum(name in m for m in metrics) < sum(
        "epsilon_rdp" in m for m in metrics
    ):
        name = "epsilon_rdp"
    eps = [(m["round"], _num(m[name])) for m in metrics if name in m]
    eps = [(r, e) for r, e in eps if math.isfinite(e)]
    if eps:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*eps, strict=True), marker="o", markersize=3, color="tab:red")
        ax.set_xlabel("round")
        ax.set_ylabel(f"epsilon ({name.removeprefix('epsilon_')})")
        ax.set_title("privacy spent")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run / "epsilon.png", dpi=100)
        plt.close(fig)
        out.append(run / "epsilon.png")
    return out


def report(run_dir: str | Path, plots: bool = True) -> tuple[list[str], list[Path]]:
    config, metrics, summary = load_run(run_dir)
    lines = statement_lines(config, summary)
    paths = write_plots(run_dir, metrics, summary["metric"]) if plots else []
    return lines, paths
