"""``dpfl simulate``, ``dpfl central`` and ``dpfl speech-corpus``: runs from config keys (flags,
a TOML file, ``--task-options.KEY``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpfl.cli.common import (
    CliError,
    Interrupted,
    _add_verbosity,
    _int_arg,
)


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
    from dpfl.config import ALIASES

    keys = p.add_argument_group("config keys (a recipe table's keys: --TABLE.KEY)")
    aliases: dict[str, list[str]] = {"client-optimizer": ["--optimizer"]}  # short forms
    for old, new in ALIASES.items():  # flat names from before the recipes' tables
        aliases.setdefault(new, []).append(f"--{old}")
    for key, default, doc in RunConfig.describe_defaults():
        also = aliases.get(key, [])
        listed = [a for a in also if a != "--optimizer"]
        shown = f"; also {', '.join(listed)}" if listed else ""
        keys.add_argument(
            f"--{key}",
            *also,
            metavar="V",
            dest=f"key:{key}",
            help=f"{doc} (default: {default}{shown})",
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
    p.add_argument(
        "--cache",
        action="store_true",
        help="also compute the log-mel feature store of every utterance now, instead of on first "
        "use; a folder that already holds a corpus of --layout and was not synthesised by dpfl "
        "(e.g. LibriSpeech) is cached as it is, never written to but for the store",
    )
    p.add_argument(
        "--splits",
        default="",
        help="with --cache: the subsets (librispeech) or TSVs (commonvoice) to cache, comma-"
        "separated (default: train,test or train.tsv,test.tsv)",
    )
    p.add_argument(
        "--feature-cache",
        default="",
        help="with --cache: the store's folder (default: <out_dir>/.dpfl-features; the same key "
        "as asr.feature-cache)",
    )
    p.set_defaults(func=_cmd_corpus)


def _cmd_corpus(args: argparse.Namespace) -> int:
    from dpfl.recipes.asr.synth import generate_corpus

    out = Path(args.out_dir)
    cv = args.layout == "commonvoice"
    default_splits = ("train.tsv", "test.tsv") if cv else ("train", "test")
    existing = (
        args.cache
        and not (out / ".complete").exists()
        and (out / default_splits[0]).exists()
    )
    if not existing:
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
            f"wrote a {args.layout} corpus of {args.speakers} + {args.test_speakers} speakers to "
            f"{out}"
        )
    if args.cache:
        splits = [x for x in args.splits.split(",") if x] or list(default_splits)
        _cache_corpus(out, args.layout, splits, args.feature_cache)
    return 0


def _cache_corpus(root: Path, layout: str, splits: list[str], folder: str) -> None:
    """Fill the corpus's feature store, with progress, and say what it holds."""
    from dpfl.recipes.asr.data import load_audio, read_common_voice, read_librispeech
    from dpfl.recipes.asr.features import FeatureStore, default_folder

    read = read_common_voice if layout == "commonvoice" else read_librispeech
    try:
        utterances = [u for split in splits for u in read(root, split)]
        store = FeatureStore(folder or default_folder(root))
    except (OSError, ValueError) as err:
        raise CliError(str(err)) from None
    before = store.rows
    step = 200
    for start in range(0, len(utterances), step):
        chunk = utterances[start : start + step]
        try:
            store.entries_for([u.audio for u in chunk], load_audio)
        except (OSError, ValueError) as err:
            raise CliError(str(err)) from None
        done = min(start + step, len(utterances))
        print(f"\rfeatures: {done}/{len(utterances)} utterances", end="", file=sys.stderr)
    print(file=sys.stderr)
    size = store.rows * store.array().shape[1] * 4 / 2**20
    print(
        f"feature store {store.folder}: {len(utterances)} utterances of {', '.join(splits)}, "
        f"{store.rows - before} new frames ({store.rows} in all, {size:.1f} MiB)"
    )


