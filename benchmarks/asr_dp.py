"""The DP-FL-for-ASR paper's central result, in kind, at a scale a 2-core CPU runs in about an hour.

1. Synthesise a multi-speaker corpus offline (espeak-ng), in LibriSpeech layout.
2. Train a seed model centrally on the first ``--seed-speakers`` speakers (their data is public).
3. Fine-tune it federated with user-level DP on the remaining speakers: LAMB on the server, the
   paper's client recipe (local SGD lr 0.2, per-step gradient clipping 1.0; fewer local steps),
   C = 0.01, with (a) flat, (b) per-layer uniform and (c) per-layer dim clipping, at the same
   noise levels: no noise and three sigma_DP with sigma_DP x sqrt(#parameters) spanning the
   paper's range (about 0.016 to 0.16).
4. Report WER/CER on held-out speakers, (epsilon, delta) as run and extrapolated to the paper's
   populations (cohort 204,800 of 6,950,600 and of 69,506,000, the same sigma_DP and rounds),
   as a Markdown table, JSON and a PNG plot.

Not a test; CI does not run it. Usage (defaults: about an hour on 2 CPU cores):
    .venv/bin/python benchmarks/asr_dp.py [--out benchmarks/results/asr_dp] [--rounds 80]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

from dpfl.config import RunConfig
from dpfl.privacy.accounting import extrapolate
from dpfl.recipes.asr.central import train_central
from dpfl.recipes.asr.synth import generate_corpus
from dpfl.simulation import simulate

PAPER_SETTINGS = [(204_800, 6_950_600), (204_800, 69_506_000)]
NOISE_SCALES = [0.0, 0.016, 0.05, 0.16]  # sigma_DP x sqrt(number of parameters)
CLIP_SCHEMES = ["flat", "uniform", "dim"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/asr_dp")
    parser.add_argument("--data-dir", default="data/bench-speech")
    parser.add_argument("--speakers", type=int, default=300)
    parser.add_argument("--seed-speakers", type=int, default=60)
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--test-speakers", type=int, default=20)
    parser.add_argument("--central-steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--cohort", type=float, default=16.0)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--server-lr", type=float, default=0.005)
    parser.add_argument(
        "--noise-scales",
        default=",".join(f"{x:g}" for x in NOISE_SCALES),
        help="sigma_DP x sqrt(parameters) values to run (0: no noise)",
    )
    parser.add_argument("--seed-model", help="reuse this seed model.pt instead of training one")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    t0 = time.perf_counter()
    generate_corpus(args.data_dir, args.speakers, args.utterances, args.test_speakers, seed=0)
    corpus_s = time.perf_counter() - t0
    base = RunConfig.from_mapping(
        {
            "task": "asr",
            "asr-size": "tiny",
            "asr-dropout": 0.1,
            "asr-layerdrop": 0.0,
            "data-format": "librispeech",
            "data-dir": args.data_dir,
            "seed-speakers": args.seed_speakers,
            "population": args.speakers - args.seed_speakers,
            "cohort-size": args.cohort,
            "rounds": args.rounds,
            "local-steps": args.local_steps,
            "client-optimizer": "sgd",
            "client-lr": 0.2,
            "client-grad-clip": 1.0,
            "batch-seconds": 10.0,
            "clip-norm": 0.01,
            "clip-mode": "clip",
            "target-epsilon": 0.0,
            "delta": 1e-9,
            "server-optimizer": "lamb",
            "server-lr": args.server_lr,
            "eval-every": args.rounds,
            "max-test-utterances": 0,
            "central-steps": args.central_steps,
            "central-lr": 1e-3,
            "diagnostics": False,
        }
    )
    seed_dir = Path(args.seed_model).parent if args.seed_model else out / "seed"
    t0 = time.perf_counter()
    if args.seed_model:
        seed = json.loads((seed_dir / "summary.json").read_text())
    else:
        seed_cfg = RunConfig.from_mapping({"run-dir": str(seed_dir), "batch-seconds": 30.0}, base)
        seed = train_central(seed_cfg, progress=False, overwrite=True)
    print(
        f"seed: {seed['speakers']} speakers, {seed['hours']:.2f} h, WER {seed['final']['wer']:.3f}"
        f" CER {seed['final']['cer']:.3f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    import torch

    params = sum(t.numel() for t in torch.load(seed_dir / "model.pt", weights_only=True).values())
    rows = []
    for scale in [float(x) for x in args.noise_scales.split(",")]:
        sigma_dp = scale / math.sqrt(params)
        for scheme in CLIP_SCHEMES:
            t0 = time.perf_counter()
            run_dir = out / f"{scheme}-{scale:g}"
            cfg = RunConfig.from_mapping(
                {
                    "clip-scheme": scheme,
                    "noise-multiplier": sigma_dp * args.cohort,
                    "init-model": str(seed_dir / "model.pt"),
                    "run-dir": str(run_dir),
                },
                base,
            )
            summary = simulate(cfg, progress=False, overwrite=True)
            eps = summary["privacy"]["epsilon"]["rdp"]["epsilon"]
            row = {
                "clip": scheme,
                "sigma_dp": sigma_dp,
                "sigma_dp_sqrt_params": scale,
                "noise_multiplier": sigma_dp * args.cohort,
                "wer": summary["final"]["wer"],
                "cer": summary["final"]["cer"],
                "loss": summary["final"]["loss"],
                "epsilon": eps,
                "rounds": summary["rounds_run"],
                "seconds": time.perf_counter() - t0,
            }
            if sigma_dp > 0:
                ext = extrapolate(sigma_dp, PAPER_SETTINGS, summary["rounds_run"], 1e-9)
                row["epsilon_extrapolated"] = {
                    f"{s}/{k}": r.result.epsilon
                    for (s, k), r in zip(PAPER_SETTINGS, ext, strict=True)
                }
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {
        "machine": f"{platform.platform()}, Python {platform.python_version()}",
        "args": vars(args),
        "parameters": params,
        "corpus_seconds": corpus_s,
        "seed": {k: seed[k] for k in ("speakers", "utterances", "hours", "steps", "final")},
        "federation": {
            "population": base.population,
            "cohort": args.cohort,
            "q": base.sample_rate,
            "delta": 1e-9,
        },
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = markdown(result)
    (out / "results.md").write_text(table)
    print(table)
    plot(result, out / "wer_vs_noise.png")
    print(
        f"wrote {out}/results.json, results.md, wer_vs_noise.png "
        f"({result['wall_seconds'] / 60:.1f} min)"
    )


def fmt_eps(e) -> str:
    e = float(e)
    return "inf" if math.isinf(e) else (f"{e:.3g}" if e < 1e5 else f"{e:.2e}")


def markdown(result: dict) -> str:
    seed = result["seed"]["final"]
    fed = result["federation"]
    lines = [
        f"Seed (central, {result['seed']['speakers']} speakers): WER {seed['wer']:.3f}, "
        f"CER {seed['cer']:.3f}. Federation: {fed['population']} speakers, expected cohort "
        f"{fed['cohort']:g} (q = {fed['q']:.4f}), {result['args']['rounds']} rounds, "
        f"delta = 1e-9, {result['parameters']:,} parameters.",
        "",
        "| clip | sigma_DP | sigma_DP*sqrt(P) | z | WER | CER | eps (as run) | "
        "eps @ 204,800/6,950,600 | eps @ 204,800/69,506,000 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ext = r.get("epsilon_extrapolated", {})
        vals = list(ext.values()) or ["-", "-"]
        lines.append(
            f"| {r['clip']} | {r['sigma_dp']:.3g} | {r['sigma_dp_sqrt_params']:g} | "
            f"{r['noise_multiplier']:.3g} | {r['wer']:.3f} | {r['cer']:.3f} | "
            f"{fmt_eps(r['epsilon'])} | "
            + " | ".join(fmt_eps(v) if v != "-" else "-" for v in vals)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for scheme, marker in zip(CLIP_SCHEMES, "osD", strict=True):
        pts = [(r["sigma_dp_sqrt_params"], r["wer"]) for r in result["rows"] if r["clip"] == scheme]
        xs = [max(x, 0.005) for x, _ in pts]  # no noise drawn at the left edge of the log axis
        ax.plot(xs, [y for _, y in pts], marker=marker, label=f"{scheme} clipping")
    ax.axhline(result["seed"]["final"]["wer"], color="grey", ls="--", label="seed model")
    ax.set_xscale("log")
    ax.set_xlabel("sigma_DP x sqrt(parameters)  (no noise drawn at 0.005)")
    ax.set_ylabel("WER on held-out speakers")
    ax.set_title("DP federated fine-tuning: WER vs noise")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
