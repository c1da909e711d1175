"""Client step of the `small` CTC transformer on a GPU, in float32 and bfloat16 autocast, and one
federated round of it through a SuperLink and SuperNodes on loopback.

One client step = forward pass on a batch of about 120 s of 16 kHz audio, CTC loss (in float32),
backward pass, gradient-norm clipping at 1.0, SGD update: the inner step of dpfl's local training.
Reported per precision: steps/s, seconds of audio per second, peak GPU memory, and the loss
after the timed steps (so a broken precision path shows up as NaN or a loss that does not move).

The client step needs only torch and torchaudio (the dpfl model modules import nothing else), so
it runs on a GPU machine that has neither flwr nor opacus. Audio is synthetic (band-limited noise
with a random envelope; throughput does not depend on the content), targets are random character
strings of about 15 characters per second. On a machine without CUDA it prints so and exits 0.

Then, when flwr and dpfl's other dependencies (opacus, dp-accounting, pytorch-optimizer,
soundfile, scipy) import, one federated round of the ASR task on a real deployment: an insecure
`flower-superlink` and `--round-nodes` `flower-supernode` processes on 127.0.0.1 (one speaker
each, q = 1), `flwr run` of dpfl's app with the paper's client recipe (``--round-steps`` local SGD
steps at lr 0.2 on ``--batch-seconds`` batches, per-step clipping at 1.0, dim clipping at
C = 0.01, z = 0.01, LAMB on the server), on the GPU. The round's data is a synthetic corpus in
LibriSpeech layout made of the same band-limited noise with random-letter transcripts, written
as FLAC with soundfile: it needs no espeak-ng (which a GPU machine may lack). Each speaker holds
one batch worth of audio, so every local step trains on the whole ~``--batch-seconds`` batch.
Reported: the round's wall time from the run's metrics.jsonl (the ServerApp's clock: sending the
model, the ClientApp processes' start-up, local training, replies, noise and server step, and the
round's evaluation on 2 test utterances), the whole `flwr run` time, and the start-up of the
SuperLink. Without those packages it prints "SuperNode round skipped: <reason>" and carries on.
``--cpu-round`` runs that round on the CPU with the `tiny` model (to check the script on a
machine without a GPU). Every process started is stopped by its process group. The whole script
stays within ``--time-limit`` seconds (default 480).

Not a test; CI does not run it. Usage:
    python benchmarks/edge_gpu.py [--size small] [--batch-seconds 120] [--steps 30] [--json F]
    python benchmarks/edge_gpu.py --cpu-round    # no GPU: the SuperNode round on the CPU only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_batch(seconds: float, utterance_seconds: float, vocab: int, generator):
    """``seconds`` of audio as utterances of ``utterance_seconds`` +-30 %, 16 kHz."""
    lengths = []
    total = 0.0
    while total < seconds:
        s = min(
            seconds - total,
            utterance_seconds * (0.7 + 0.6 * torch.rand(1, generator=generator).item()),
        )
        s = max(s, 1.0)
        lengths.append(int(s * 16_000))
        total += s
    n, longest = len(lengths), max(lengths)
    noise = torch.randn(n, longest, generator=generator)
    kernel = torch.hann_window(33)[None, None, :] / 16
    waves = torch.nn.functional.conv1d(noise[:, None, :], kernel, padding="same")[:, 0]
    envelope = torch.rand(n, longest // 1600 + 1, generator=generator).repeat_interleave(1600, 1)
    waves = waves * envelope[:, :longest]
    lens = torch.tensor(lengths)
    waves[torch.arange(longest)[None, :] >= lens[:, None]] = 0.0
    target_lengths = (lens / 16_000 * 15).long().clamp(min=1)
    targets = torch.randint(1, vocab, (int(target_lengths.sum()),), generator=generator)
    return {"waves": waves, "lengths": lens, "targets": targets, "target_lengths": target_lengths}


def measure(model, batch, precision: str, steps: int, warmup: int, device) -> dict:
    from dpfl.models.asr.text import CharTokenizer

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            log_probs, out_lengths = model(batch["waves"], batch["lengths"])
        loss = torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1).float(),
            batch["targets"],
            out_lengths,
            batch["target_lengths"],
            blank=CharTokenizer.blank,
            zero_infinity=True,
        )
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    first = float(step())
    for _ in range(warmup - 1):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    audio = float(batch["lengths"].sum()) / 16_000
    return {
        "precision": precision,
        "steps": steps,
        "seconds": elapsed,
        "steps_per_s": steps / elapsed,
        "audio_seconds_per_s": steps * audio / elapsed,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "first_loss": first,
        "last_loss": float(loss),
    }


ROUND_DEPENDENCIES = ("flwr", "opacus", "dp_accounting", "pytorch_optimizer", "soundfile", "scipy")


def missing_round_dependencies() -> str | None:
    """Why the SuperNode round cannot run here, or None when it can."""
    import importlib

    for name in ROUND_DEPENDENCIES:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or OSError for a missing libsndfile
            return f"{name} does not import ({type(err).__name__}: {err})"
    try:  # everything the ServerApp and the ClientApp import
        importlib.import_module("dpfl.flower.server_app")
        importlib.import_module("dpfl.flower.client_app")
    except Exception as err:
        return f"dpfl's Flower app does not import ({type(err).__name__}: {err})"
    return None


def flower_scripts(flower_local) -> None:
    """Point dpfl's helpers at Flower's console scripts. They expect them next to the Python
    executable (a venv); with flwr installed elsewhere (say, wheels unpacked onto PYTHONPATH),
    write small launchers for its entry points into a temporary folder instead."""
    if (flower_local.BIN / "flower-superlink").exists():
        return
    from importlib.metadata import entry_points

    folder = Path(tempfile.mkdtemp(prefix="dpfl-flwr-bin-"))
    for ep in entry_points(group="console_scripts"):
        if ep.dist is None or ep.dist.name.lower() != "flwr":
            continue
        module, _, attr = ep.value.partition(":")
        script = folder / ep.name
        script.write_text(
            f"#!{sys.executable}\nimport sys\nfrom {module} import {attr.strip()} as main\n"
            "sys.exit(main())\n"
        )
        script.chmod(0o755)
    flower_local.BIN = folder


def random_text(chars: int, generator) -> str:
    """Random lower-case words of 2-8 letters, about ``chars`` characters in all."""
    words, total = [], 0
    while total < max(chars, 2):
        n = int(torch.randint(2, 9, (1,), generator=generator))
        letters = torch.randint(0, 26, (n,), generator=generator).tolist()
        words.append("".join(chr(ord("a") + i) for i in letters))
        total += n + 1
    return " ".join(words)


def write_noise_corpus(
    root: Path, speakers: int, seconds: float, utterance_seconds: float, seed: int = 0
) -> dict:
    """A LibriSpeech-layout corpus of synthetic audio (no espeak-ng): ``speakers`` training
    speakers with ``seconds`` of audio each, one test speaker with 2 utterances of 4 s."""
    import soundfile

    gen = torch.Generator().manual_seed(seed)
    audio = {"train": 0.0, "test": 0.0}
    layout = [("train", str(1000 + k), seconds, utterance_seconds) for k in range(speakers)]
    layout.append(("test", str(1000 + speakers), 8.0, 4.0))
    for subset, spk, total, utt in layout:
        folder = root / subset / spk / "1"
        folder.mkdir(parents=True, exist_ok=True)
        batch = synthetic_batch(total, utt, 2, gen)
        lines = []
        for i, (wave, n) in enumerate(zip(batch["waves"], batch["lengths"].tolist(), strict=True)):
            w = wave[:n]
            w = 0.5 * w / w.abs().max().clamp(min=1e-6)
            soundfile.write(str(folder / f"{spk}-1-{i:04d}.flac"), w.numpy(), 16_000, format="FLAC")
            text = random_text(int(n / 16_000 * 15), gen).upper()
            lines.append(f"{spk}-1-{i:04d} {text}")
            audio[subset] += n / 16_000
        (folder / f"{spk}-1.trans.txt").write_text("\n".join(lines) + "\n")
    return audio


def stop_processes(procs: list[subprocess.Popen], flower_local) -> None:
    """SIGTERM each started process's group (they were started in sessions of their own), then
    SIGKILL what is left; SuperExec helpers that left the group (tied to their parent by
    ``--parent-pid``) are stopped by PID."""
    helpers = [
        pid
        for p in procs
        for pid in flower_local.pids_matching("--parent-pid", f" {p.pid} ")
        if pid != os.getpid()
    ]
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
    if helpers:
        flower_local.kill(helpers, timeout=10)


def supernode_round(args, device: str, size: str, deadline: float) -> dict:
    """One federated round of the ASR task through a SuperLink and SuperNodes on loopback."""
    from support import flower_local as fl

    flower_scripts(fl)
    tmp = Path(tempfile.mkdtemp(prefix="dpfl-edge-round-"))
    nodes = args.round_nodes
    batch_seconds = args.batch_seconds if device == "cuda" else args.cpu_round_batch_seconds
    steps = args.round_steps if device == "cuda" else args.cpu_round_steps
    # one batch per speaker (a little under batch-seconds, so it packs into one batch)
    audio = write_noise_corpus(tmp / "speech", nodes, batch_seconds - 1.0, args.utterance_seconds)
    port = fl.free_port()
    env = fl.deployment_home(tmp / "flwr", "edge", port, None)
    procs: list[subprocess.Popen] = []
    result: dict = {
        "device": device,
        "size": size,
        "nodes": nodes,
        "local_steps": steps,
        "batch_seconds": batch_seconds,
        "audio_seconds_per_speaker": audio["train"] / nodes,
    }

    def start(cmd: list[str], log: str) -> None:
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=open(tmp / log, "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tmp,
            )
        )

    def left() -> float:
        return deadline - time.monotonic()

    run_dir = tmp / "run"
    values = {
        "task": "asr",
        "asr-size": size,
        "asr-dropout": 0.1,
        "asr-layerdrop": 0.0,
        "data-format": "librispeech",
        "data-dir": str(tmp / "speech"),
        "population": nodes,
        "cohort-size": float(nodes),  # q = 1: every speaker trains in the round
        "rounds": args.round_rounds,
        "local-steps": steps,
        "client-optimizer": "sgd",
        "client-lr": 0.2,
        "client-grad-clip": 1.0,
        "batch-seconds": batch_seconds,
        "clip-norm": 0.01,
        "clip-scheme": "dim",
        "noise-multiplier": 0.01,
        "target-epsilon": 0.0,
        "server-optimizer": "lamb",
        "server-lr": 0.002,
        "eval-every": args.round_rounds,
        "max-test-utterances": 2,
        "device": device,
        "diagnostics": True,  # the exact counts it reports (diag_*)
        "round-timeout": 300.0,
        "run-dir": str(run_dir),
    }
    app = fl.ROOT  # dpfl's Flower app: its [tool.flwr.app.config] declares every config key
    t_start = time.perf_counter()
    try:
        start(fl.superlink_command(port), "superlink.log")
        fl.wait_for_port(port, timeout=max(10.0, min(120.0, left())))
        result["superlink_start_seconds"] = time.perf_counter() - t_start
        for i in range(nodes):
            start(fl.supernode_command(port, i, nodes), f"supernode-{i}.log")
        t_run = time.perf_counter()
        try:
            cmd = [str(fl.BIN / "flwr"), "run", str(app), "edge", "--stream"]
            cmd += ["--run-config", fl.run_config_arg(values)]
            res = subprocess.run(
                cmd, cwd=app, env=env, capture_output=True, text=True, timeout=max(30.0, left())
            )
        except subprocess.TimeoutExpired:
            result["error"] = f"flwr run did not finish within the time limit ({args.time_limit} s)"
            return result
        result["flwr_run_seconds"] = time.perf_counter() - t_run
        result["flwr_run_rc"] = res.returncode
        result["status"] = [r.get("status") for r in fl.run_status(env, "edge")]
        metrics = run_dir / "metrics.jsonl"
        if res.returncode != 0 or not metrics.exists():
            tail = (res.stderr or res.stdout)[-1500:]
            result["error"] = f"flwr run failed (rc {res.returncode}): {tail}"
            return result
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        rounds = [r for r in rows if r.get("round", 0) > 0]
        if not rounds or result["status"] != ["finished:completed"]:
            result["error"] = f"no completed round ({len(rounds)} rounds, {result['status']})"
            return result
        result.update(
            {
                "round_seconds": [r["seconds"] for r in rounds],
                "accepted": [r.get("diag_accepted") for r in rounds],
                "cohort": [r.get("diag_cohort") for r in rounds],
                "eval": {k: v for k, v in rounds[-1].items() if k.startswith("eval_")},
            }
        )
    except Exception as err:  # a SuperLink that does not start, a bad metrics file, ...
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        stop_processes(procs, fl)
        result["total_seconds"] = time.perf_counter() - t_start
        if "error" in result or "round_seconds" not in result:
            result["logs"] = str(tmp)  # kept for a look at what went wrong
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def report_round(r: dict) -> None:
    head = (
        f"SuperNode round ({r['nodes']} SuperNode{'s' if r['nodes'] > 1 else ''} on loopback,"
        f" '{r['size']}' model on"
        f" {r['device']}, {r['local_steps']} local steps of"
        f" {r['audio_seconds_per_speaker']:.0f} s of audio per speaker):"
    )
    if "error" in r:
        print(f"{head} FAILED: {r['error']} (logs in {r['logs']})", flush=True)
        return
    times = ", ".join(f"{s:.2f}" for s in r["round_seconds"])
    print(
        f"{head}\n  round wall time {times} s (metrics.jsonl 'seconds'),"
        f" accepted {r['accepted']} of cohort {r['cohort']}, status {r['status']}\n"
        f"  flwr run {r['flwr_run_seconds']:.1f} s, SuperLink start-up"
        f" {r['superlink_start_seconds']:.1f} s, all {r['total_seconds']:.1f} s;"
        f" eval {', '.join(f'{k[5:]} {v:.3g}' for k, v in r['eval'].items())}",
        flush=True,
    )


def client_steps(args, device: torch.device, info: dict) -> None:
    from dpfl.models.asr.models import build_asr_model
    from dpfl.models.asr.text import CharTokenizer

    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(
        args.batch_seconds, args.utterance_seconds, CharTokenizer().vocab_size, gen
    )
    info.update(
        {
            "size": args.size,
            "utterances": len(batch["lengths"]),
            "audio_seconds": float(batch["lengths"].sum()) / 16_000,
            "results": [],
        }
    )
    print(
        f"{info['gpu']}, torch {info['torch']}: '{args.size}' model,"
        f" batch {info['audio_seconds']:.1f} s of audio in {info['utterances']} utterances",
        flush=True,
    )
    for precision in args.precisions.split(","):
        torch.manual_seed(0)
        model = (
            build_asr_model("transformer", args.size, CharTokenizer().vocab_size).to(device).train()
        )
        r = measure(model, batch, precision, args.steps, args.warmup, device)
        info["results"].append(r)
        print(
            f"  {precision}: {r['steps_per_s']:.2f} steps/s,"
            f" {r['audio_seconds_per_s']:.0f} s audio/s, peak {r['peak_memory_gib']:.2f} GiB,"
            f" loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}",
            flush=True,
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(info["results"]) > 1:
        base = info["results"][0]
        for r in info["results"][1:]:
            speed = r["steps_per_s"] / base["steps_per_s"]
            print(
                f"  {r['precision']} vs {base['precision']}: {speed:.2f}x"
                f" steps/s, {r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x peak memory"
            )


def main() -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch-seconds", type=float, default=120.0)
    parser.add_argument("--utterance-seconds", type=float, default=12.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--cpu", action="store_true", help="dry run of the client step on the CPU")
    parser.add_argument("--round-nodes", type=int, default=2, help="SuperNodes (one user each)")
    parser.add_argument("--round-steps", type=int, default=10, help="local steps in the round")
    parser.add_argument("--round-rounds", type=int, default=1, help="federated rounds to run")
    parser.add_argument("--skip-round", action="store_true", help="no SuperNode round")
    parser.add_argument(
        "--cpu-round",
        action="store_true",
        help="run the SuperNode round on the CPU with the tiny model (no GPU needed)",
    )
    parser.add_argument("--cpu-round-steps", type=int, default=2)
    parser.add_argument("--cpu-round-batch-seconds", type=float, default=20.0)
    parser.add_argument(
        "--time-limit", type=float, default=480.0, help="seconds the whole script may take"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    info: dict = {
        "gpu": torch.cuda.get_device_name() if cuda else "none",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if cuda or args.cpu:
        if args.cpu:
            info["gpu"] = "cpu (dry run)"
        client_steps(args, torch.device("cpu" if args.cpu else "cuda"), info)
    else:
        print(
            "edge_gpu: no CUDA GPU found; nothing to measure"
            + ("" if args.cpu_round else " (exit 0)"),
            flush=True,
        )
        if not args.cpu_round:
            return 0

    failed = False
    if args.skip_round:
        info["supernode_round"] = {"skipped": "--skip-round"}
    elif not (cuda or args.cpu_round):
        reason = "no GPU (--cpu-round runs it on the CPU)"
        print(f"SuperNode round skipped: {reason}", flush=True)
        info["supernode_round"] = {"skipped": reason}
    elif (reason := missing_round_dependencies()) is not None:
        print(f"SuperNode round skipped: {reason}", flush=True)
        info["supernode_round"] = {"skipped": reason}
    else:
        on_cpu = args.cpu_round
        r = supernode_round(
            args,
            device="cpu" if on_cpu else "cuda",
            size="tiny" if on_cpu else args.size,
            deadline=started + args.time_limit - 45,  # leaves time to stop the processes
        )
        info["supernode_round"] = r
        report_round(r)
        failed = "error" in r
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
