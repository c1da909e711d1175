"""One short GPU check (under 5 minutes on an H100): the CUDA tests, an ASR round against the bare
training step at the same batch-seconds, the secure noise for the paper's model, and the conv
net's vectorised round; every figure to one JSON file.

The GPU machine has no network and no espeak-ng, so the speech corpus is made beforehand on a CPU
machine (about 25 MB: 12 speakers x 40 utterances, about 2 min of audio each) and travels with the
checkout; here it is copied under 17 speaker ids each (204 speakers, more than the decoded-audio
cache's 64), its features computed into a fresh store (timed apart), then:

* ``asr``: dpfl's simulator on CUDA, the `small` transformer, batches of <= 120 s of audio
  (each step one speaker's whole data), 2 local steps, a cohort of 16 of 204, per-layer clipping,
  noise and LAMB; against the bare step: the same model, the same kind of 120-s batch from the
  same store, forward, backward and an SGD step, nothing else. Seconds of audio trained per
  second for both, and their ratio (the issue's target: the round >= 75 % of the bare step);
  with the round's --profile breakdown.
* ``noise``: ``GaussianMechanism.noisy_mean`` on zero sums shaped like the paper's model (255.8M
  coordinates) on the GPU, from the secure generator: seconds per round and normals per second.
* ``conv``: examples/digits' CNN, 200 users, cohort 100, 4 local steps: dpfl's round on CUDA
  one client at a time and vectorised (federated_speed.py's conv-net workload).
* ``tests``: ``pytest tests/test_cuda.py tests/client/test_device_aware.py`` (the device tests).

Usage:
    # on a CPU machine with espeak-ng: the corpus, inside the checkout so it travels with it
    .venv/bin/python benchmarks/gpu_check.py --make-corpus gpu-corpus
    # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --corpus gpu-corpus --json gpu_check.json
    # a smoke run of the same code on the CPU (small sizes; figures meaningless)
    .venv/bin/python benchmarks/gpu_check.py --corpus gpu-corpus --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

BASE_SPEAKERS, UTTERANCES, COPIES = 12, 40, 17
BATCH_SECONDS = 120.0


def make_corpus(folder: str) -> None:
    from dpfl.recipes.asr.synth import generate_corpus

    out = generate_corpus(folder, BASE_SPEAKERS, UTTERANCES, test_speakers=1, seed=7)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20
    print(f"corpus in {out}: {size:.1f} MiB")


def run_tests(device: str) -> dict:
    if device != "cuda":
        return {"skipped": "not on CUDA"}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py",
         "tests/client/test_device_aware.py"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-500:]
    return {"returncode": res.returncode, "summary": tail, "seconds": time.perf_counter() - t0}


def prepare_speech(corpus: Path, tmp: Path, copies: int) -> tuple[Path, Path, dict]:
    """(the expanded corpus, its filled store, timings)."""
    from asr_round_profile import expand_corpus

    t0 = time.perf_counter()
    expanded = expand_corpus(corpus, tmp / "speech", copies)
    store = tmp / "store"
    t1 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dpfl", "speech-corpus", str(expanded), "--cache",
         "--feature-cache", str(store)],
        check=True, capture_output=True,
    )  # fmt: skip
    return expanded, store, {"copy_s": t1 - t0, "feature_store_fill_s": time.perf_counter() - t1}


def bare_step(expanded: Path, store: Path, device: str, size: str, steps: int) -> dict:
    """Forward, backward and an SGD step of the ASR model on 120-s batches from the store."""
    from dpfl.models.asr.task import ASRTask
    from dpfl.recipes.asr.data import SpeechFederatedDataset, read_librispeech
    from dpfl.recipes.asr.features import FeatureStore

    ds = SpeechFederatedDataset(
        read_librispeech(expanded, "train"), [], features=FeatureStore(store)
    )
    task = ASRTask(size=size, dropout=0.0, layerdrop=0.0, spec_augment=False)
    torch.manual_seed(0)
    model = task.build_model().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = []
    for user in range(min(steps, ds.num_users)):
        data = ds.user_data(user)
        idx, total = [], 0.0
        for i in sorted(range(len(data)), key=lambda i: data.durations[i]):
            if total + data.durations[i] > BATCH_SECONDS:
                break
            idx.append(i)
            total += data.durations[i]
        batches.append((data.batch(torch.tensor(idx)), total))

    def step(batch):
        opt.zero_grad(set_to_none=True)
        task.loss(model, {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                          for k, v in batch.items()}).backward()  # fmt: skip
        opt.step()

    for batch, _ in batches[:2]:  # warm-up: kernels for these shapes
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    audio = 0.0
    for batch, seconds in batches:
        step(batch)
        audio += seconds
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {
        "steps": len(batches),
        "audio_s": audio,
        "seconds": elapsed,
        "audio_s_per_s": audio / elapsed,
        "batch_seconds_mean": audio / len(batches),
    }


def asr_round(expanded: Path, store: Path, device: str, size: str, rounds: int, cohort: float):
    from dpfl.config import RunConfig
    from dpfl.models.asr.task import ASRTask
    from dpfl.profiling import profiled
    from dpfl.simulation import simulate

    audio = {"s": 0.0, "per_round": []}
    original = ASRTask.loss

    def counting(self, model, batch):
        audio["s"] += float(batch["lengths"].sum()) / 16_000
        return original(self, model, batch)

    ASRTask.loss = counting
    speakers = len([p for p in (expanded / "train").iterdir() if p.is_dir()])
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = RunConfig.from_mapping({
            "task": "asr", "asr-size": size, "asr-dropout": 0.0, "asr-layerdrop": 0.0,
            "spec-augment": False, "data-format": "librispeech", "data-dir": str(expanded),
            "feature-cache": str(store), "population": speakers, "cohort-size": cohort,
            "rounds": rounds, "local-steps": 2, "client-optimizer": "sgd", "client-lr": 0.2,
            "client-grad-clip": 1.0, "batch-seconds": BATCH_SECONDS, "clip-norm": 0.01,
            "clip-scheme": "dim", "noise-multiplier": 0.01, "target-epsilon": 0.0, "delta": 1e-9,
            "server-optimizer": "lamb", "server-lr": 0.002, "eval-every": 1000,
            "max-test-utterances": 4, "device": device, "diagnostics": False, "run-dir": run_dir,
        })  # fmt: skip

        with profiled() as profile:  # audio seconds at each round's end, from its round marks
            original_end = profile.end_round

            def end_round(seconds, _orig=original_end):
                audio["per_round"].append(audio["s"])
                _orig(seconds)

            profile.end_round = end_round
            simulate(cfg, progress=False, overwrite=True)
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    ASRTask.loss = original
    seconds = [r["seconds"] for r in rows if r.get("round", 0) > 0]
    marks = [0.0, *audio["per_round"]]
    per_round_audio = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    timed = range(1, len(seconds) - 1) if len(seconds) >= 3 else range(len(seconds))
    audio_s = sum(per_round_audio[i] for i in timed)
    time_s = sum(seconds[i] for i in timed)
    return {"rounds": len(seconds), "round_seconds": seconds, "audio_per_round": per_round_audio,
            "audio_s_per_s": audio_s / time_s, "profile": profile.table()}  # fmt: skip


def noise(device: str, quick: bool) -> dict:
    from noise_speed import paper_shapes

    from dpfl.privacy.mechanisms import GaussianMechanism, NoiseSource

    shapes = paper_shapes()
    if quick:
        shapes = shapes[:20]
    sums = {f"t{i}": torch.zeros(s, device=device) for i, s in enumerate(shapes)}
    total = sum(t.numel() for t in sums.values())
    mech = GaussianMechanism(1.0, 0.01, NoiseSource(device=device))
    mech.noisy_mean(sums, 1.0, inplace=True)  # warm-up: buffers, threads
    times = []
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mech.noisy_mean(sums, 1.0, inplace=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"coordinates": total, "round_seconds": med, "normals_per_s": total / med}


def conv(device: str, rounds: int) -> dict:
    import federated_speed as fs

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "conv.pt"
        fs.export_users("conv-net", data)
        for mode in ("off", "on"):
            spec = {"workload": "conv-net", "work": {**fs.PLAIN_WORKLOADS["conv-net"],
                    "device": device}, "rounds": rounds, "data": str(data),
                    "run-dir": str(Path(tmp) / mode)}  # fmt: skip
            times = fs.dpfl_child(spec, mode)
            out[f"vectorize_{mode}_ms"] = statistics.median(times[1:-1] or times) * 1000
    out["vectorised_speedup"] = out["vectorize_off_ms"] / out["vectorize_on_ms"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make-corpus", metavar="DIR", help="make the corpus (CPU, espeak-ng) and stop")
    p.add_argument("--corpus", help="the corpus made by --make-corpus")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the code")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    if args.make_corpus:
        make_corpus(args.make_corpus)
        return 0
    if not args.corpus:
        p.error("--corpus is required (make it with --make-corpus on a CPU machine)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing measured (try --device cpu --quick)")
        return 1
    quick = args.quick
    size, copies = ("tiny", 2) if quick else ("small", COPIES)
    result: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": quick,
    }
    t_all = time.perf_counter()
    result["tests"] = run_tests(args.device)
    print("tests:", result["tests"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        expanded, store, result["speech_setup"] = prepare_speech(Path(args.corpus), Path(tmp),
                                                                 copies)  # fmt: skip
        print("speech setup:", result["speech_setup"], flush=True)
        result["asr_bare_step"] = bare_step(expanded, store, args.device, size, 4 if quick else 24)
        print("bare step:", result["asr_bare_step"], flush=True)
        rounds = 2 if quick else 6
        result["asr_round"] = asr_round(expanded, store, args.device, size, rounds,
                                        4.0 if quick else 16.0)  # fmt: skip
        print(result["asr_round"].pop("profile"), flush=True)
    ratio = result["asr_round"]["audio_s_per_s"] / result["asr_bare_step"]["audio_s_per_s"]
    result["asr_round_over_bare_step"] = ratio
    print(f"ASR round audio-s/s / bare step's: {ratio:.1%} (target >= 75%: "
          f"{'met' if ratio >= 0.75 else 'NOT met'})", flush=True)  # fmt: skip
    result["noise"] = noise(args.device, quick)
    print("noise:", result["noise"], flush=True)
    result["conv"] = conv(args.device, 3 if quick else 6)
    print("conv net:", result["conv"], flush=True)
    result["total_seconds"] = time.perf_counter() - t_all
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["tests"].get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
