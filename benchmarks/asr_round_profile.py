"""Where an ASR round's time goes when speakers outnumber the decoded-audio cache: dpfl's
simulator on a population of 240 speakers, with ``--profile``, decoding audio on every use
(``asr.feature-cache = "off"``, the path before the feature store) against reading features
from the store, and (``--before REV``) the same workload on an earlier dpfl checked out in a
temporary git worktree.

Workload: the `tiny` CTC transformer (no dropout, layer-drop or SpecAugment, so the rounds
compare), a synthetic espeak-ng corpus of 24 speakers x 6 utterances copied under 10 speaker ids
each (240 speakers: the dataset's LRU cache holds 64 decoded users, so nearly every sampled
speaker is decoded again), Poisson cohorts of 24 expected, 2 local SGD steps of <= 15 s of audio,
flat clipping and noise, evaluation only after the last round. The store is filled before the
timed run (``dpfl speech-corpus --cache``), as in a long run where every speaker has been
sampled before. Reports, per variant, the median round time over rounds 2.. and the breakdown:
batch building, weights in/out, fwd/bwd/step, clipping, data (fetching a user), and the share
of the round outside fwd/bwd/step. Turns alternate; each figure is the median over turns.

Not a test. Usage:
    .venv/bin/python benchmarks/asr_round_profile.py [--rounds 6] [--repeat 2] [--before c0d8f79]
        [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_SPEAKERS, UTTERANCES, COPIES = 24, 6, 10
WORKLOAD = {
    "task": "asr",
    "asr-size": "tiny",
    "asr-dropout": 0.0,
    "asr-layerdrop": 0.0,
    "spec-augment": False,
    "data-format": "librispeech",
    "max-test-utterances": 4,
    "population": BASE_SPEAKERS * COPIES,
    "cohort-size": 24.0,
    "local-steps": 2,
    "batch-seconds": 15.0,
    "client-optimizer": "sgd",
    "client-lr": 0.2,
    "clip-norm": 0.5,
    "clip-scheme": "flat",
    "noise-multiplier": 1.0,
    "target-epsilon": 0.0,
    "delta": 1e-5,
    "server-optimizer": "sgd",
    "server-lr": 1.0,
    "eval-every": 1000,
    "diagnostics": False,
    "seed": 0,
}


def expand_corpus(base: Path, out: Path, copies: int) -> Path:
    """``base`` (LibriSpeech layout) with every training speaker present ``copies`` times under
    new ids (hard links where the file system allows, else copies); the test split once."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base / "test", out / "test", dirs_exist_ok=True)
    for trans in sorted((base / "train").glob("*/*/*.trans.txt")):
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        for k in range(copies):
            new = f"{speaker}{k:02d}"
            folder = out / "train" / new / chapter
            folder.mkdir(parents=True, exist_ok=True)
            lines = []
            for line in trans.read_text().splitlines():
                utt, text = line.split(maxsplit=1)
                new_utt = utt.replace(f"{speaker}-", f"{new}-", 1)
                target = folder / f"{new_utt}.flac"
                if not target.exists():
                    try:
                        os.link(trans.parent / f"{utt}.flac", target)
                    except OSError:
                        shutil.copyfile(trans.parent / f"{utt}.flac", target)
                lines.append(f"{new_utt} {text}")
            (folder / f"{new}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return out


def make_corpus(folder: Path) -> Path:
    """The 240-speaker corpus in ``folder`` (synthesised once; not timed)."""
    from dpfl.recipes.asr.synth import generate_corpus

    base = generate_corpus(folder / "base", BASE_SPEAKERS, UTTERANCES, test_speakers=1, seed=5)
    return expand_corpus(base, folder / "expanded", COPIES)


CHILD = """
import json, sys
from dpfl.config import RunConfig
from dpfl.profiling import profiled
from dpfl.simulation import simulate
with profiled() as profile:
    simulate(RunConfig.from_mapping(json.loads(sys.argv[1])), progress=False, overwrite=True)
rounds = profile.rounds[1:]
keys = sorted({k for r in rounds for k in r})
print(json.dumps({k: sorted(r.get(k, 0.0) for r in rounds)[len(rounds) // 2] for k in keys}))
print(profile.table())
"""


def measure(values: dict, pythonpath: str | None = None) -> tuple[dict, str]:
    """(median seconds per phase over rounds 2.., the breakdown table) of one fresh process."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    res = subprocess.run(  # run from the tree measured: `-c` puts the working folder first
        [sys.executable, "-c", CHILD, json.dumps(values)],
        capture_output=True,
        text=True,
        env=env,
        cwd=pythonpath or ROOT,
    )
    if res.returncode != 0:
        raise SystemExit(f"run failed:\n{res.stderr[-3000:]}")
    first, _, table = res.stdout.partition("\n")
    return json.loads(first), table


def outside_share(phases: dict) -> float | None:
    """The share of the round outside forward/backward/step (None where it is not split)."""
    if "fwd/bwd/step" not in phases:
        return None
    return 1 - phases["fwd/bwd/step"] / phases["round (total)"]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--before", default="", help="a git revision to measure as 'before'")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp)
        store = tmp / "store"
        subprocess.run(
            [sys.executable, "-m", "dpfl", "speech-corpus", str(corpus), "--cache",
             "--feature-cache", str(store)],
            check=True, capture_output=True,
        )  # fmt: skip
        common = {**WORKLOAD, "data-dir": str(corpus), "rounds": args.rounds}
        variants: dict[str, tuple[dict, str | None]] = {}
        if args.before:
            tree = tmp / "before"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before],
                check=True, capture_output=True,
            )  # fmt: skip
            variants[f"dpfl {args.before} (decodes on use)"] = (common, str(tree))
        variants["decode on use (feature-cache off)"] = ({**common, "feature-cache": "off"}, None)
        variants["feature store"] = ({**common, "feature-cache": str(store)}, None)
        turns: dict[str, list[dict]] = {name: [] for name in variants}
        tables: dict[str, str] = {}
        try:
            for i in range(args.repeat):
                for name, (values, path) in variants.items():
                    phases, tables[name] = measure({**values, "run-dir": str(tmp / f"r{i}")}, path)
                    turns[name].append(phases)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tmp / "before")], capture_output=True)  # fmt: skip
    result = {}
    for name, runs in turns.items():
        keys = sorted({k for r in runs for k in r})
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
        result[name] = {"phases_s": med, "outside_fwd_bwd_step": outside_share(med),
                        "turns_round_s": [r["round (total)"] for r in runs]}  # fmt: skip
    print(f"ASR round, tiny, {WORKLOAD['population']} speakers, cohort 24, 2 steps of <= 15 s")
    print(f"(medians over rounds 2-{args.rounds}, then over {args.repeat} alternating turns)\n")
    for name, r in result.items():
        share = r["outside_fwd_bwd_step"]
        share_text = f"{share:.1%}" if share is not None else "not split"
        print(f"{name}: {1000 * r['phases_s']['round (total)']:.0f} ms/round, outside "
              f"fwd/bwd/step {share_text}")  # fmt: skip
        print(tables[name], "\n")
    first = result[next(iter(result))]["phases_s"]["round (total)"]
    last = result["feature store"]
    print(f"round time, first variant / feature store: "
          f"{first / last['phases_s']['round (total)']:.2f}x; share outside fwd/bwd/step with "
          f"the store {last['outside_fwd_bwd_step']:.1%} (target <= 10%: "
          f"{'met' if last['outside_fwd_bwd_step'] <= 0.10 else 'NOT met'})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
