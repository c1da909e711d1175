"""Per-layer vs global clipping under DP, where the difference can appear: the DP-FL-for-ASR
paper's central comparison, in kind, on a 2-core CPU.

1. Synthesise a multi-speaker corpus offline (espeak-ng), LibriSpeech layout.
2. Train a seed model per model shape centrally on the first ``--seed-speakers`` speakers (public
   data): ``tiny`` (40 tensors) and ``deep`` (16 narrow blocks, 136 tensors).
3. Fine-tune it federated with user-level DP on the other speakers (C = 0.01, the paper's client
   recipe with fewer local steps) in cells (model, variant, noise, seed). Variants: global (flat)
   clip; per-layer ``dim`` and ``uniform`` bounds, each in ``clip`` and ``rescale`` mode (the
   paper's released code); all with LAMB on the server, plus global clip with an Adam and an SGD
   server (the non-layer-wise baselines). Noise: sigma_DP x sqrt(#parameters), the noise norm on
   the average relative to C.
4. Staged, as the full grid does not fit:
   stage 1: global vs dim-rescale on ``tiny`` across the noise sweep, to find where they part;
   stage 2: every variant on both models at the two noise levels around that point (picked from
   stage 1 unless ``--stage2-scales``), with a second seed for global and dim-rescale.
   Cells run in priority order (global and dim-rescale, their second seeds, the other per-layer
   variants, the Adam and SGD baselines) and stop starting once ``--budget-minutes`` is spent;
   results.md lists what was cut.
5. Per cell: WER/CER on held-out speakers, (epsilon, delta) as run and extrapolated to the
   paper's populations, wall time, and the per-layer ratios r_h = (|D_h|/|D|) / sqrt(d_h/d) of
   the clients' pre-clip deltas (non-private diagnostics, recorded here to explain the outcome).

Each cell writes ``cells/<model>-<variant>-<scale>-s<seed>.json`` when it finishes; ``--resume``
skips finished cells. Writes results.md, results.json and wer_vs_noise.png.

Not a test; CI does not run it. On 2 CPU cores the corpus and the two seeds take about 25 min and
a cell about 5.5 min, so the whole plan (12 + 32 cells) takes about 4 h: run it in sittings,
each stopped by ``--budget-minutes``, and continue with ``--resume``:
    .venv/bin/python benchmarks/asr_dp.py [--out benchmarks/results/asr_dp] [--resume]
Run it from a copy of the code (or leave the tree alone) while it runs: it imports modules
lazily.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

from dpfl.config import RunConfig
from dpfl.privacy.accounting import extrapolate
from dpfl.recipes.asr.central import train_central
from dpfl.recipes.asr.synth import generate_corpus
from dpfl.simulation import simulate

PAPER_SETTINGS = [(204_800, 6_950_600), (204_800, 69_506_000)]
STAGE1_SCALES = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]  # sigma_DP x sqrt(number of parameters)
MODELS = ("tiny", "deep")
VARIANTS = {  # name: (clip-scheme, clip-mode, server optimizer)
    "global": ("flat", "clip", "lamb"),
    "dim-rescale": ("dim", "rescale", "lamb"),
    "dim-clip": ("dim", "clip", "lamb"),
    "uniform-rescale": ("uniform", "rescale", "lamb"),
    "uniform-clip": ("uniform", "clip", "lamb"),
    "global-adam": ("flat", "clip", "adam"),
    "global-sgd": ("flat", "clip", "sgd"),
}
SERVER_LR = {"lamb": 0.005, "adam": 0.001, "sgd": 1.0}  # sgd at 1: plain FedAvg of the mean
SEEDED = ("global", "dim-rescale")  # the variants run with a second seed in stage 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/asr_dp")
    parser.add_argument("--data-dir", default="data/bench-speech")
    parser.add_argument("--speakers", type=int, default=300)
    parser.add_argument("--seed-speakers", type=int, default=60)
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--test-speakers", type=int, default=20)
    parser.add_argument("--central-steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--cohort", type=float, default=16.0)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--stage", choices=("1", "2", "all"), default="all")
    parser.add_argument(
        "--stage1-scales", default=",".join(f"{x:g}" for x in STAGE1_SCALES),
        help="sigma_DP x sqrt(parameters) values of stage 1 (0: no noise)",
    )  # fmt: skip
    parser.add_argument("--stage2-scales", help="two values for stage 2 (default: from stage 1)")
    parser.add_argument("--budget-minutes", type=float, default=120.0)
    parser.add_argument("--resume", action="store_true", help="skip cells already written")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    generate_corpus(args.data_dir, args.speakers, args.utterances, args.test_speakers, seed=0)
    times["corpus"] = time.perf_counter() - t0
    base = {
        "task": "asr",
        "asr.size": "tiny",
        "asr.dropout": 0.1,
        "asr.layerdrop": 0.0,
        "asr.data-format": "librispeech",
        "asr.data-dir": args.data_dir,
        "asr.seed-speakers": args.seed_speakers,
        "asr.max-test-utterances": 0,
        "asr.central-steps": args.central_steps,
        "asr.central-lr": 1e-3,
        "cohort-size": args.cohort,
        "rounds": args.rounds,
        "local-steps": args.local_steps,
        "client-optimizer": "sgd",
        "client-lr": 0.2,
        "client-grad-clip": 1.0,
        "batch-seconds": 10.0,
        "clip-norm": 0.01,
        "target-epsilon": 0.0,
        "delta": 1e-9,
        "eval-every": args.rounds,
        "diagnostics": True,  # the per-layer ratios (non-private; a benchmark's diagnostics)
    }
    seeds = {}
    for model in MODELS:
        t0 = time.perf_counter()
        seeds[model] = seed_model(out / f"seed-{model}", {**base, "asr.size": model})
        times[f"seed {model}"] = time.perf_counter() - t0

    def budget_left() -> bool:
        return (time.perf_counter() - started) / 60 < args.budget_minutes

    cut: list[str] = []
    if args.stage in ("1", "all"):
        t0 = time.perf_counter()
        for scale in [float(x) for x in args.stage1_scales.split(",")]:
            for variant in SEEDED:
                if not run_cell(out, base, seeds, "tiny", variant, scale, 0, args, budget_left):
                    cut.append(key("tiny", variant, scale, 0))
        times["stage 1"] = time.perf_counter() - t0
    cells = load_cells(out)
    scales2 = (
        [float(x) for x in args.stage2_scales.split(",")]
        if args.stage2_scales
        else pick_scales(cells)
    )
    if args.stage in ("2", "all") and scales2:
        t0 = time.perf_counter()
        others = [v for v in VARIANTS if v not in SEEDED]
        order = [(m, v, s, 0) for v in SEEDED for m in MODELS for s in scales2]
        order += [(m, v, s, 1) for v in SEEDED for m in MODELS for s in scales2]
        order += [(m, v, s, 0) for v in others for m in MODELS for s in scales2]
        for cell in order:
            if not run_cell(out, base, seeds, *cell, args, budget_left):
                cut.append(key(*cell))
        times["stage 2"] = time.perf_counter() - t0
    result = {
        "machine": f"{platform.platform()}, {platform.processor() or 'cpu'}, Python "
        f"{platform.python_version()}",
        "args": vars(args),
        "seeds": seeds,
        "stage2_scales": scales2,
        "times_seconds": times,
        "cut": cut,
        "cells": load_cells(out),
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (out / "results.md").write_text(text)
    print(text)
    plot(result, out / "wer_vs_noise.png")
    print(f"wrote {out}/results.json, results.md, wer_vs_noise.png")


def key(model: str, variant: str, scale: float, seed: int) -> str:
    return f"{model}-{variant}-{scale:g}-s{seed}"


def seed_model(run_dir: Path, values: dict) -> dict:
    """The central seed (reused when its folder holds one): its WER/CER and parameter count."""
    import torch

    if not (run_dir / "summary.json").is_file():
        train_central(
            RunConfig.from_mapping({**values, "run-dir": str(run_dir), "batch-seconds": 30.0}),
            progress=False,
            overwrite=True,
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    seed = {
        "model": str(run_dir / "model.pt"),
        "speakers": summary["speakers"],
        "hours": summary["hours"],
        "wer": summary["final"]["wer"],
        "cer": summary["final"]["cer"],
        "parameters": sum(t.numel() for t in weights.values()),
        "tensors": len(weights),
    }
    print(f"seed {values['asr.size']}: {json.dumps(seed)}", flush=True)
    return seed


def run_cell(out, base, seeds, model, variant, scale, seed, args, budget_left) -> bool:
    """Run one cell (or find it written); False when the budget is spent before it starts."""
    path = out / "cells" / f"{key(model, variant, scale, seed)}.json"
    if args.resume and path.is_file():
        return True
    if not budget_left():
        return False
    scheme, mode, server = VARIANTS[variant]
    sigma_dp = scale / math.sqrt(seeds[model]["parameters"])
    run_dir = out / "runs" / key(model, variant, scale, seed)
    cfg = RunConfig.from_mapping({
        **base, "asr.size": model, "clip-scheme": scheme, "clip-mode": mode,
        "server-optimizer": server, "server-lr": SERVER_LR[server],
        "noise-multiplier": sigma_dp * args.cohort, "init-model": seeds[model]["model"],
        "seed": seed, "run-dir": str(run_dir),
    })  # fmt: skip
    t0 = time.perf_counter()
    summary = simulate(cfg, progress=False, overwrite=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ratios = [r for r in rows if "diag_layer_ratio_median" in r]
    cell = {
        "model": model,
        "variant": variant,
        "clip_scheme": scheme,
        "clip_mode": mode,
        "server_optimizer": server,
        "seed": seed,
        "sigma_dp_sqrt_params": scale,
        "sigma_dp": sigma_dp,
        "noise_multiplier": sigma_dp * args.cohort,
        "wer": summary["final"]["wer"],
        "cer": summary["final"]["cer"],
        "rounds": summary["rounds_run"],
        "epsilon": summary["privacy"]["epsilon"]["rdp"]["epsilon"],
        "seconds": time.perf_counter() - t0,
        "r_h": {
            k: statistics.median(r[f"diag_layer_ratio_{k}"] for r in ratios)
            for k in ("p05", "median", "p95")
        }
        if ratios
        else {},
        "r_h_lowest_last_round": ratios[-1]["diag_layer_ratio_lowest"] if ratios else {},
        "r_h_highest_last_round": ratios[-1]["diag_layer_ratio_highest"] if ratios else {},
    }
    if sigma_dp > 0:
        ext = extrapolate(sigma_dp, PAPER_SETTINGS, summary["rounds_run"], 1e-9)
        cell["epsilon_extrapolated"] = {
            f"{s}/{k}": r.result.epsilon for (s, k), r in zip(PAPER_SETTINGS, ext, strict=True)
        }
    path.write_text(json.dumps(cell, indent=2) + "\n")
    print(json.dumps({k: cell[k] for k in ("model", "variant", "seed", "sigma_dp_sqrt_params",
                                           "wer", "cer", "seconds")}), flush=True)  # fmt: skip
    return True


def load_cells(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def pick_scales(cells: list[dict]) -> list[float]:
    """The stage-1 noise level where global and dim-rescale on tiny differ most, and its upper
    neighbour (the lower one at the top of the sweep)."""
    wer = {(c["variant"], c["sigma_dp_sqrt_params"]): c["wer"] for c in cells
           if c["model"] == "tiny" and c["seed"] == 0}  # fmt: skip
    scales = sorted({s for v, s in wer if s > 0 and ("global", s) in wer
                     and ("dim-rescale", s) in wer})  # fmt: skip
    if not scales:
        return []
    gap = {s: abs(wer[("global", s)] - wer[("dim-rescale", s)]) for s in scales}
    i = scales.index(max(scales, key=lambda s: gap[s]))
    j = i + 1 if i + 1 < len(scales) else i - 1
    return sorted({scales[i], scales[j]}) if j >= 0 else [scales[i]]


def fmt_eps(e) -> str:
    e = float(e)
    return "inf" if math.isinf(e) else (f"{e:.3g}" if e < 1e5 else f"{e:.2e}")


def markdown(result: dict) -> str:
    args = result["args"]
    lines = [
        f"Machine: {result['machine']}. Federation: {args['speakers'] - args['seed_speakers']} "
        f"speakers, expected cohort {args['cohort']:g}, {args['rounds']} rounds, "
        f"{args['local_steps']} local SGD steps, C = 0.01, delta = 1e-9. Seeds (central, "
        f"{args['seed_speakers']} speakers, {args['central_steps']} steps):",
        "",
    ]
    for model, s in result["seeds"].items():
        lines.append(
            f"- `{model}`: {s['parameters']:,} parameters in {s['tensors']} tensors; "
            f"seed WER {s['wer']:.3f}, CER {s['cer']:.3f}"
        )
    lines += ["", "Stage times: " + ", ".join(
        f"{k} {v / 60:.1f} min" for k, v in result["times_seconds"].items()
    ) + f"; total {result['wall_seconds'] / 60:.1f} min.", ""]  # fmt: skip
    lines += [
        "| model | variant | seed | sigma_DP*sqrt(P) | sigma_DP | z | WER | CER | r_h p05 / "
        "median / p95 | eps (as run) | eps @ 204,800/6,950,600 | eps @ 204,800/69,506,000 | "
        "min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {v: i for i, v in enumerate(VARIANTS)}
    cells = sorted(result["cells"], key=lambda c: (
        c["model"], c["sigma_dp_sqrt_params"], order[c["variant"]], c["seed"]))  # fmt: skip
    for c in cells:
        ext = list(c.get("epsilon_extrapolated", {}).values()) or ["-", "-"]
        r = c["r_h"]
        rh = f"{r['p05']:.2g} / {r['median']:.2g} / {r['p95']:.2g}" if r else "-"
        lines.append(
            f"| {c['model']} | {c['variant']} | {c['seed']} | {c['sigma_dp_sqrt_params']:g} | "
            f"{c['sigma_dp']:.3g} | {c['noise_multiplier']:.3g} | {c['wer']:.3f} | "
            f"{c['cer']:.3f} | {rh} | {fmt_eps(c['epsilon'])} | "
            + " | ".join(fmt_eps(v) if v != "-" else "-" for v in ext)
            + f" | {c['seconds'] / 60:.1f} |"
        )
    lines += ["", "Seed spread (|WER seed 0 - seed 1|, same cell otherwise):", ""]
    by = {(c["model"], c["variant"], c["sigma_dp_sqrt_params"], c["seed"]): c for c in cells}
    for (m, v, s, seed), c in sorted(by.items()):
        other = by.get((m, v, s, 1))
        if seed == 0 and other is not None:
            lines.append(f"- {m} {v} at {s:g}: {abs(c['wer'] - other['wer']):.3f}")
    lowest = {}
    for c in cells:
        if c["r_h_lowest_last_round"] and c["model"] not in lowest:
            lowest[c["model"]] = c["r_h_lowest_last_round"]
    lines += ["", "Tensors with the lowest r_h (last round of the first cell of each model):", ""]
    for m, names in lowest.items():
        lines.append(f"- {m}: " + ", ".join(f"`{k}` {v:.3g}" for k, v in names.items()))
    if result["cut"]:
        lines += ["", "Cut (budget spent before they started): " + ", ".join(result["cut"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4.2), squeeze=False)
    for ax, model in zip(axes.flat, MODELS, strict=True):
        for variant, marker in zip(VARIANTS, "osD^v<>", strict=True):
            pts = sorted(
                (c["sigma_dp_sqrt_params"], c["wer"]) for c in result["cells"]
                if c["model"] == model and c["variant"] == variant and c["seed"] == 0
            )  # fmt: skip
            if pts:
                xs = [max(x, 0.1) for x, _ in pts]  # no noise drawn at the left edge
                ax.plot(xs, [y for _, y in pts], marker=marker, label=variant)
        if model in result["seeds"]:
            ax.axhline(result["seeds"][model]["wer"], color="grey", ls="--", label="seed model")
        ax.set_xscale("log")
        ax.set_xlabel("sigma_DP x sqrt(parameters)  (no noise drawn at 0.1)")
        ax.set_ylabel("WER on held-out speakers")
        ax.set_title(f"{model}: WER vs noise")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
