"""What every way of running dpfl shares: building the task and data from a config, resolving the
noise, the server spec, and the run folder (metrics as JSON lines, summary, privacy statement).

The in-process simulator and the Flower ServerApp both call these, so a run reads the same
whichever way it was started.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfl.client.train import (
    LocalTrainConfig,
    Weights,
    federated_split,
    global_weights,
    load_weights,
    private_weights,
)
from dpfl.config import RunConfig
from dpfl.models.tasks import TASKS, ClassificationTask, Task
from dpfl.privacy.accounting import EpsilonResult, PrivacyLedger
from dpfl.privacy_plan import NoisePlan, privacy_statement, resolve_noise, server_spec
from dpfl.profiling import round_done, section
from dpfl.server.round import (
    EventLog,
    RoundAggregator,
    ServerState,
    load_checkpoint,
    save_checkpoint,
)
from dpfl.server.sampling import CohortSampler
from dpfl.simulations.data import FederatedDataset, SyntheticClassification

log = logging.getLogger(__name__)


def client_seed(seed: int, round_number: int, user: int) -> int:
    """The local-training seed of one user in one round (the same in every way of running)."""
    seq = np.random.SeedSequence([int(seed), 11, int(round_number), int(user)])
    return int(seq.generate_state(1)[0])


def build_task(cfg: RunConfig) -> Task:
    norm = {"norm": cfg.norm_name(), "norm_options": cfg.norm_options()}
    if cfg.task == "classification":
        return ClassificationTask(hidden=cfg.hidden_sizes, **norm)
    if cfg.task == "asr":
        from dpfl.models.asr.text import CharTokenizer

        return TASKS["asr"](
            tokenizer=CharTokenizer(cfg.alphabet),
            arch=cfg.asr_arch,
            size=cfg.asr_size,
            dropout=cfg.asr_dropout,
            layerdrop=cfg.asr_layerdrop,
            spec_augment=cfg.spec_augment,
            **norm,
        )
    if cfg.task == "localization":
        return TASKS["localization"](
            adaptive=cfg.ofvl_adaptive,
            score_init=cfg.ofvl_score_init,
            penalty=cfg.ofvl_penalty,
            **norm,
        )
    return TASKS[cfg.task]()


def scene_names(cfg: RunConfig) -> list[str]:
    """The configured scenes, rendering the synthetic ones on first use."""
    names = [s.strip() for s in cfg.scenes.split(",") if s.strip()]
    if names:
        return names
    from dpfl.simulations.scenes import render_scene

    names = [f"scene-{k}" for k in range(cfg.synthetic_scenes)]
    for k, name in enumerate(names):
        render_scene(
            cfg.scenes_dir,
            name,
            seed=1000 * cfg.seed + k,
            train_frames=cfg.scene_train_frames,
            test_frames=cfg.scene_test_frames,
        )
    return names


SPEECH_SPLITS = {"commonvoice": ("train.tsv", "test.tsv")}
"""The train and test split names of a speech format (LibriSpeech layout: train, test)."""


def speech_splits(cfg: RunConfig) -> tuple[str, str]:
    """The configured data-train and data-test, or the format's own names."""
    train, test = SPEECH_SPLITS.get(cfg.data_format, ("train", "test"))
    return cfg.data_train or train, cfg.data_test or test


def speech_corpus(cfg: RunConfig):
    """(train utterances, test utterances) of the configured corpus, generating a synthetic one
    on first use. With test-split, the test utterances are held out of data-train."""
    from dpfl.simulations.speech import hold_out, read_common_voice, read_librispeech

    if cfg.data_format == "synthetic":
        from dpfl.simulations.speech_synth import generate_corpus

        log.info("synthetic speech corpus in %s", cfg.data_dir)
        generate_corpus(
            cfg.data_dir,
            speakers=cfg.synthetic_speakers,
            utterances=cfg.synthetic_utterances,
            test_speakers=cfg.synthetic_test_speakers,
            seed=cfg.seed,
        )
    read = read_common_voice if cfg.data_format == "commonvoice" else read_librispeech
    train_name, test_name = speech_splits(cfg)
    train = read(cfg.data_dir, train_name)
    if cfg.test_split:
        train, test = hold_out(train, cfg.test_split, cfg.test_fraction, cfg.seed)
        log.info(
            "test set: %d utterances held out of %s by %s (test-fraction %g)",
            len(test),
            train_name,
            cfg.test_split,
            cfg.test_fraction,
        )
        return train, test
    return train, read(cfg.data_dir, test_name)


def build_dataset(cfg: RunConfig) -> FederatedDataset:
    if cfg.task == "classification":
        return SyntheticClassification(
            num_users=cfg.population, examples_per_user=cfg.examples_per_user, seed=cfg.seed
        )
    if cfg.task == "asr":
        from dpfl.models.asr.text import CharTokenizer
        from dpfl.simulations.speech import SpeechFederatedDataset, split_speakers

        train, test = speech_corpus(cfg)
        seed_speakers, _ = split_speakers(train, cfg.seed_speakers)
        dataset = SpeechFederatedDataset(
            train,
            test,
            tokenizer=CharTokenizer(cfg.alphabet),
            test_from_users=cfg.test_split == "utterance",
            exclude=seed_speakers,
            max_test_utterances=cfg.max_test_utterances,
        )
        if dataset.num_users != cfg.population:
            raise ValueError(
                f"config key population = {cfg.population}, but the corpus in {cfg.data_dir} "
                f"has {dataset.num_users} speakers to federate ({cfg.seed_speakers} kept for "
                f"the seed): set population = {dataset.num_users}"
            )
        return dataset
    if cfg.task == "localization":
        from dpfl.models.localization.task import SceneDataset

        dataset = SceneDataset(cfg.scenes_dir, scene_names(cfg))
        if dataset.num_users != cfg.population:
            raise ValueError(
                f"config key population = {cfg.population}, but there are {dataset.num_users} "
                f"scenes (one client each): set population = {dataset.num_users}"
            )
        return dataset
    raise ValueError(f"no built-in dataset for task {cfg.task!r}")


def load_model_file(model: torch.nn.Module, path: str | Path) -> None:
    """Load a ``model.pt`` (trainable parameters, as written by a run) into ``model``."""
    try:
        weights = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ValueError(f"config key init-model: {path} does not exist") from None
    load_weights(model, weights)


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key device = 'cuda': no CUDA device is available")
    return torch.device(cfg.device)


def local_config(cfg: RunConfig) -> LocalTrainConfig:
    return LocalTrainConfig(
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.client_lr,
        optimizer=cfg.client_optimizer,
        options=cfg.client_options(),
        grad_clip=cfg.client_grad_clip,
        batch_seconds=cfg.batch_seconds,
        precision=cfg.precision,
        micro_batch_size=cfg.micro_batch_size,
        micro_batch_seconds=cfg.micro_batch_seconds,
    )


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


CLIENT_STATE = "clients/state.pt"
"""The simulated clients' own state (client-kept parameters), apart from the server's
checkpoint: it identifies the users who trained, as a device's own disk would."""


class RunWriter:
    """The run folder: ``config.toml``-like ``config.json``, ``metrics.jsonl``, ``summary.json``."""

    RUN_FILES = (
        "metrics.jsonl",
        "charges.jsonl",
        "checkpoint.pt",
        "summary.json",
        "config.json",
        "model.pt",
        CLIENT_STATE,
    )
    """What a run leaves in its folder (a new run refuses to write over them)."""

    def __init__(
        self,
        run_dir: str | Path,
        resume: bool = False,
        enabled: bool = True,
        overwrite: bool = False,
    ) -> None:
        """A new run (neither ``resume`` nor ``overwrite``) refuses a folder that holds a run:
        nothing a user made is deleted without being asked. ``overwrite`` deletes that run's
        files first. ``enabled = False``: a writer that reads but never writes (the other ranks
        of a distributed simulation; rank 0 writes)."""
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.dir / "metrics.jsonl"
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"config key run-dir = {str(run_dir)!r} is a file, not a folder")
        if resume:
            if not self.checkpoint_path.is_file():
                raise ValueError(
                    f"cannot resume: {self.dir} holds no checkpoint.pt (a run checkpoints with "
                    "checkpoint-every > 0)"
                )
            return
        if not enabled:
            return  # rank 0 checks (and may clear) the folder
        found = [name for name in self.RUN_FILES if (self.dir / name).exists()]
        if found and not overwrite:
            raise ValueError(
                f"the run folder {self.dir} already holds a run ({', '.join(found)}): continue it "
                "with --resume, replace it with --overwrite, or choose another run-dir"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in found:
            (self.dir / name).unlink()

    def write_config(self, cfg: RunConfig, extra: dict[str, Any]) -> None:
        if not self.enabled:
            return
        data = {"config": cfg.to_dict(), **extra, "machine": platform.platform()}
        (self.dir / "config.json").write_text(json.dumps(_json_value(data), indent=2) + "\n")

    def truncate_after(self, round_number: int) -> int:
        """On resume: drop metric lines of rounds after the checkpoint (they will be re-run);
        returns how many were dropped (a torn last line, from a crash mid-write, counts)."""
        if not self.metrics_path.exists():
            return 0
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]

        def kept(line: str) -> bool:
            try:
                return json.loads(line).get("round", 0) <= round_number
            except json.JSONDecodeError:
                return False

        keep = [line for line in lines if kept(line)]
        if self.enabled:
            self.metrics_path.write_text("".join(line + "\n" for line in keep))
        return len(lines) - len(keep)

    def initial_eval(self) -> dict[str, float] | None:
        """The evaluation before training (the round-0 line), if the metrics file has it."""
        if not self.metrics_path.exists():
            return None
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("round") == 0:
                return {k[5:]: v for k, v in row.items() if k.startswith("eval_")} or None
        return None

    @property
    def charges_path(self) -> Path:
        return self.dir / "charges.jsonl"

    def record_charge(self, round_number: int, attempt: int, z: float, q: float) -> None:
        """One charged attempt, written and flushed to disk before anything it produced is
        released (a metric line, a checkpoint, the model sent to the next cohort), so a crash
        can never lose a charge."""
        if not self.enabled:
            return
        line = json.dumps(
            {"round": round_number, "attempt": attempt, "noise_multiplier": z, "sample_rate": q}
        )
        with self.charges_path.open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_charges(self, default: tuple[float, float]) -> list[tuple[float, float]] | None:
        """The charged attempts as (z, q), or None when the folder has no journal. A torn last
        line (a crash mid-write) counts, at ``default``: the charge may have been meant."""
        if not self.charges_path.exists():
            return None
        out = []
        for line in self.charges_path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append((float(row["noise_multiplier"]), float(row["sample_rate"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                out.append(default)
        return out

    def keep_charges(self, count: int) -> None:
        """Keep the first ``count`` journal lines (a reproducible replay writes the rest again)."""
        if not self.enabled or not self.charges_path.exists():
            return
        lines = [x for x in self.charges_path.read_text().splitlines() if x.strip()][:count]
        self.charges_path.write_text("".join(line + "\n" for line in lines))

    def append(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **metrics}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(_json_value(record)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        (self.dir / "summary.json").write_text(json.dumps(_json_value(summary), indent=2) + "\n")

    def write_model(self, weights: dict[str, torch.Tensor]) -> None:
        """The final global model (trainable parameters), readable with weights_only=True."""
        if not self.enabled:
            return
        torch.save(weights, self.dir / "model.pt")

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"


# Collects one attempt's updates into the aggregator; returns its non-private diagnostics
# (``diag_*`` keys only: exact counts, per-client statistics), recorded only with diagnostics on.
Collect = Callable[[int, np.ndarray, Weights, RoundAggregator], dict[str, Any]]
# Rank 0's value of an object on every rank (torchrun); the identity in one process.
Share = Callable[[Any], Any]


def _alone(value: Any) -> Any:
    return value


class FederatedRun:
    """The loop every way of running shares: budget check before every attempt, secret cohort,
    collect, noisy decision, server step, evaluation, metrics, checkpoints, summary. Only
    ``collect`` differs: in process (the simulator) or through Flower messages (the strategy)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: bool = False,
        progress: bool = True,
        primary: bool = True,
        ranks: int = 1,
        share: Share | None = None,
        overwrite: bool = False,
    ) -> None:
        """``resume``: continue from the run folder's checkpoint (only ``rounds`` may differ
        from its config: an extension); ``overwrite``: replace the run the folder holds (a new
        run refuses such a folder). ``primary = False``: another rank of a distributed
        simulation (of ``ranks``), which runs the rounds but neither evaluates nor writes the
        run folder; ``share`` gives every rank rank 0's cohorts, decisions and ledger."""
        self.started = time.perf_counter()
        self.ranks = ranks
        self.cfg = cfg
        self.primary = primary
        self.share = share or _alone
        self.writer = RunWriter(cfg.run_dir, resume=resume, enabled=primary, overwrite=overwrite)
        # On resume: the checkpoint, checked against this config before anything is built.
        self.prior = self._read_checkpoint() if resume else None
        torch.manual_seed(cfg.seed)  # the initial model
        self.device = pick_device(cfg)
        self.task = build_task(cfg)
        self.dataset = build_dataset(cfg)
        self.model = self.task.build_model().to(self.device)
        if cfg.init_model:
            load_model_file(self.model, cfg.init_model)
        self.test_data = self.dataset.test_data()
        # A resumed run keeps the noise it started with: an extension of its rounds is never
        # recalibrated (that would spend the old rounds' budget again at a lower noise).
        self.noise = (
            NoisePlan(**self.prior["noise"])
            if self.prior is not None and "noise" in self.prior
            else resolve_noise(cfg)
        )
        self.rounds_planned: list[int] = (
            list(self.prior.get("rounds_planned", [self.prior["config"]["rounds"]]))
            if self.prior is not None
            else [cfg.rounds]
        )
        if self.rounds_planned[-1] != cfg.rounds:
            self.rounds_planned.append(cfg.rounds)
        self.initial: dict[str, float] | None = (
            self.prior.get("initial") if self.prior is not None else None
        )
        # A test set drawn from the federated users' own data (held-out utterances).
        self.eval_on_user_data = getattr(self.dataset, "test_from_users", False)
        self.spec = server_spec(cfg, self.noise)
        # Cohorts come from their own secret key (never from `seed`), or from sampling-seed.
        self.sampler = (
            CohortSampler.secret()
            if cfg.sampling_seed < 0
            else CohortSampler.from_seed(cfg.sampling_seed)
        )
        # Parameters a task keeps on the client (scene-specific, FedBN-style) are never sent:
        # the server holds the others; each client's private ones live in a store that costs
        # nothing for clients never sampled.
        # Running statistics of norm layers stay there too with norm-stats = "client"; with
        # "server" they are sent with the update and the server averages them (no optimizer).
        self.private, self.buffers = federated_split(self.task, self.model, cfg.norm_stats)
        self.initial_private = (
            private_weights(self.model, self.private, self.buffers) if self.private else {}
        )
        self.private_store: dict[int, Weights] = {}
        self.eval_uses_private = False
        sent = global_weights(self.model, self.private, self.buffers)
        self.state = ServerState(
            sent, self.spec, cfg.rounds, averaged=frozenset(self.buffers) & set(sent)
        )
        self.state.events = EventLog(each=cfg.diagnostics)
        if resume:
            self._resume()
        self.progress = progress and primary
        self.writer.write_config(
            cfg,
            {
                "noise_multiplier": self.noise.noise_multiplier,
                "count_noise_multiplier": self.noise.count_noise_multiplier,
                "charged_noise_multiplier": self.noise.effective,
                "noise_calibrated": self.noise.calibrated,
                "rounds_planned": self.rounds_planned,
                "delta": self.spec.delta,
                "device": str(self.device),
            },
        )

    @property
    def name_users(self) -> bool:
        """Whether logs may name the users of a round: only when the cohorts are not secret."""
        return not self.sampler.secure

    def _read_checkpoint(self) -> dict[str, Any]:
        """The run folder's checkpoint, if its config matches this one. Only ``rounds`` may
        differ, and only grow: that extends the run (same noise, same ledger, same budget)."""
        ckpt = load_checkpoint(self.writer.checkpoint_path)
        old, new = ckpt["config"], self.cfg.to_dict()
        defaults = {key: default for key, default, _ in RunConfig.describe_defaults()}
        changed = [
            key for key in new if old.get(key, defaults[key]) != new[key] and key != "rounds"
        ] + [key for key in old if key not in new]
        if changed:
            shown = "; ".join(
                f"{key}: {old.get(key, defaults.get(key))!r} -> {new.get(key, '(gone)')!r}"
                for key in changed
            )
            raise ValueError(
                f"cannot resume {self.cfg.run_dir}: its checkpoint was written with a different "
                f"config ({shown}); only rounds may change, to extend the run"
            )
        done = ckpt["server"]["round"]
        if new["rounds"] != old["rounds"]:
            if new["rounds"] < max(old["rounds"], done):
                raise ValueError(
                    f"config key rounds = {new['rounds']}: a resumed run can extend its "
                    f"{old['rounds']} planned rounds, not shorten them"
                )
            if "noise" not in ckpt and self.cfg.dp_enabled:
                raise ValueError(
                    "cannot extend this run: its checkpoint does not record the noise it "
                    "started with (written by an older dpfl)"
                )
            log.info(
                "extending the run from %d to %d planned rounds (noise kept: z is not "
                "recalibrated; the budget stop still applies)",
                old["rounds"],
                new["rounds"],
            )
        return ckpt

    def _resume(self) -> None:
        ckpt = self.prior
        self.state.load_state_dict(ckpt["server"])
        clients = Path(self.cfg.run_dir) / CLIENT_STATE
        if self.private and clients.exists():
            self.private_store = load_checkpoint(clients)
        # Rank 0 alone reads the journal and truncates the metrics; every rank takes its ledger.
        if self.primary:
            self._charge_replays()
        ledger = self.share(self.state.ledger.to_dict() if self.primary else None)
        self.state.ledger = PrivacyLedger.from_dict(ledger)
        log.info("resumed from round %d", self.state.round)

    def _charge_replays(self) -> None:
        """Charge what ran after the checkpoint and will run again.

        The journal (``charges.jsonl``) holds every attempt charged before its release; the
        checkpoint's ledger holds those up to the checkpoint. The attempts in between released
        aggregates that the re-run will not reproduce, so they stay charged, unless the run is
        fully reproducible (noise-seed and sampling-seed): then the re-run repeats exactly the
        same releases (same cohorts, same noise) and reveals nothing new. A run with a noise
        seed but secret cohorts would repeat the lost rounds' noise on other cohorts, so it is
        moved to fresh noise streams: two sums under one noise would release their difference
        without any noise.
        """
        spec, state = self.spec, self.state
        metric_lines = self.writer.truncate_after(state.round)
        if not spec.dp:
            return
        kept = state.ledger.rounds
        charged = spec.charged_noise_multiplier, spec.sample_rate
        journal = self.writer.read_charges(default=charged)
        extra = journal[kept:] if journal is not None else []
        if len(extra) < metric_lines:  # an older folder, or a journal that lost lines
            extra += [charged] * (metric_lines - len(extra))
        if not extra:
            return
        if not state.noise.secure and not self.sampler.secure:
            self.writer.keep_charges(kept)
            log.info("reproducible run: the %d replayed attempts repeat exactly", len(extra))
            return
        for z, q in extra:
            state.ledger.record(z, q)
        log.warning("charging %d replayed attempts to the privacy budget", len(extra))
        if not state.noise.secure:
            state.noise.skip_to_fresh_streams()
            log.warning(
                "noise-seed with secret cohorts: the replayed rounds draw fresh noise (their old "
                "noise on other cohorts would release the difference of two sums unnoised)"
            )

    def evaluate(self) -> dict[str, float]:
        if not self.primary:
            return {}
        if self.private and hasattr(self.task, "evaluate_federated"):
            # per client, with its private parameters (available in simulation only)
            self.eval_uses_private = True
            return self.task.evaluate_federated(
                self.model,
                self.dataset,
                self.state.weights(),
                self.private_store.get,
                load_weights,
            )
        load_weights(self.model, self.state.weights())
        kept_stats = [b for b in self.buffers if self.private and self.private(b)]
        if kept_stats:
            # Norm statistics kept by the clients: the simulator evaluates the global model
            # with their mean over the users trained so far (a simulation-only diagnostic; a
            # deployed server never sees them). Before any user trained: the initial ones.
            stored = [u for u in self.private_store.values() if kept_stats[0] in u]
            self.eval_uses_private = self.eval_uses_private or bool(stored)
            source = stored or [self.initial_private]
            load_weights(
                self.model,
                {b: torch.stack([u[b].float() for u in source]).mean(0) for b in kept_stats},
            )
        return self.task.evaluate(self.model, self.test_data)

    def _eval_metrics(self, values: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {f"eval_{k}": v for k, v in values.items()}
        if values and (self.eval_uses_private or self.eval_on_user_data):
            out["eval_non_private"] = 1  # computed with per-user private state: a diagnostic
        return out

    def load_client(self, user: int) -> None:
        """Put ``user``'s private parameters into the workspace model (first time: fresh)."""
        if not self.private:
            return
        stored = self.private_store.get(user)
        load_weights(self.model, stored if stored is not None else self.initial_private)
        if stored is None and hasattr(self.task, "prepare_private"):
            self.task.prepare_private(self.model, self.dataset.user_data(user))

    def keep_client(self, user: int) -> None:
        if self.private:
            self.private_store[user] = private_weights(self.model, self.private, self.buffers)

    def _budget_ahead(self) -> EpsilonResult | None:
        """Epsilon under the configured accountant if one more attempt is charged (None when
        there is no budget to keep)."""
        cfg, spec = self.cfg, self.spec
        if not (cfg.target_epsilon > 0 and spec.accounted):
            return None
        with section("accounting"):
            return self.state.ledger.epsilon_after(
                spec.charged_noise_multiplier,
                spec.sample_rate,
                1,
                spec.delta,
                cfg.accountant,
                fallback=True,
            )

    def _epsilon_metrics(
        self, metrics: dict[str, Any], ahead: EpsilonResult | None, last: bool
    ) -> None:
        """Per-round epsilon, named by the accountant that computed it: RDP every round
        (cheap), the configured accountant whenever the budget check computed it (every
        attempt when there is a target) and otherwise on evaluation rounds and the last."""
        cfg, spec = self.cfg, self.spec
        if not spec.accounted or cfg.accountant == "rdp":
            return
        if ahead is None and not (last or metrics["round"] % cfg.eval_every == 0):
            return
        if ahead is None:
            with section("accounting"):
                ahead = self.state.ledger.epsilon(spec.delta, cfg.accountant, fallback=True)
        if ahead.accountant != "rdp":
            metrics[f"epsilon_{ahead.accountant}"] = ahead.epsilon

    def _attempts(self, round_number: int, collect: Collect) -> dict[str, Any] | None:
        """Run round ``round_number`` (retrying as configured); its metrics, or None when the
        budget does not allow another attempt."""
        cfg, state = self.cfg, self.state
        attempt = 0
        while True:
            ahead = self._budget_ahead()  # before EVERY attempt: a retry is charged too
            if ahead is not None and ahead.epsilon > cfg.target_epsilon:
                log.warning(
                    "stopping before round %d%s: it would bring epsilon to %.4g > target %.4g",
                    round_number,
                    f" (attempt {attempt + 1})" if attempt else "",
                    ahead.epsilon,
                    cfg.target_epsilon,
                )
                return None
            with section("sampling"):
                cohort = self.share(
                    self.sampler.cohort(
                        cfg.population, cfg.sample_rate, round_number, attempt, cfg.sampling
                    )
                    if self.primary
                    else None
                )
            agg = state.begin_round()
            extra = collect(round_number, cohort, state.weights(), agg)
            unlabelled = [k for k in extra if not k.startswith("diag_")]
            if unlabelled:
                raise RuntimeError(f"collect returned unlabelled per-client values: {unlabelled}")
            diagnostics: dict[str, Any] = {}
            if cfg.diagnostics:
                diagnostics = {**agg.diagnostics(), "diag_cohort": len(cohort), **extra}
                if agg.norms:  # server-side clipping stats
                    diagnostics.setdefault("diag_update_norm_mean", float(np.mean(agg.norms)))
                    diagnostics.setdefault("diag_fraction_clipped", agg.clipped / len(agg.norms))
            # rank 0's decision on every rank (drawn once)
            agg.decision = self.share(state.decide(agg, cfg.min_replies) if self.primary else None)
            decision = agg.decision
            if decision.apply:
                metrics = state.finish_round(agg)
                self._journal(round_number, attempt)
                break
            give_up = cfg.on_too_few == "skip" or attempt >= cfg.max_retries
            log.warning(
                "round %d: too few accepted replies for min-replies %d%s: %s (charged)",
                round_number,
                cfg.min_replies,
                ""
                if decision.noisy_count is None
                else f" (noisy count {decision.noisy_count:.1f})",
                "skipped" if give_up else "retrying",
            )
            metrics = state.discard_round(agg, advance=give_up)
            self._journal(round_number, attempt)
            self._epsilon_metrics(metrics, ahead, last=False)
            if give_up:
                break
            self.writer.append({**metrics, **diagnostics, "retry": 1})
            attempt += 1
        metrics["attempts"] = attempt + 1  # post-processing of noisy counts: public
        self._epsilon_metrics(metrics, ahead, last=round_number == cfg.rounds)
        metrics.update(diagnostics)
        return metrics

    def _journal(self, round_number: int, attempt: int) -> None:
        if self.spec.dp and self.primary:
            spec = self.spec
            self.writer.record_charge(
                round_number, attempt, spec.charged_noise_multiplier, spec.sample_rate
            )

    def _checkpoint(self) -> None:
        cfg, state = self.cfg, self.state
        save_checkpoint(
            self.writer.checkpoint_path,
            {
                "config": cfg.to_dict(),
                "server": state.state_dict(),
                "noise": dataclasses.asdict(self.noise),
                "initial": self.initial,
                "rounds_planned": self.rounds_planned,
            },
        )
        self.checkpointed = state.round
        if self.private:
            path = Path(cfg.run_dir) / CLIENT_STATE
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, self.private_store)

    def run(self, collect: Collect, *, stop_after_round: int | None = None) -> dict[str, Any]:
        """Run the remaining rounds; ``stop_after_round`` ends early, as if the process stopped."""
        cfg, state = self.cfg, self.state
        if state.round == 0:
            self.initial = self.evaluate()
            self.writer.append({"round": 0, **self._eval_metrics(self.initial)})
        if self.initial is None and state.round > 0:
            self.initial = self.writer.initial_eval()  # a checkpoint from an older dpfl
        initial = self.initial  # a resumed run keeps the first run's
        last_eval: dict[str, float] = initial or {}
        self.checkpointed = state.round if self.prior is not None else -1
        stopped_for_budget = crashed = False
        round_times: list[float] = []
        bar = _Progress(self.progress, cfg.rounds, state.round)
        try:
            while state.round < cfg.rounds:
                if stop_after_round is not None and state.round >= stop_after_round:
                    crashed = True  # as if the process stopped here: no final checkpoint
                    break
                t0 = time.perf_counter()
                round_number = state.round + 1
                metrics = self._attempts(round_number, collect)
                if metrics is None:
                    stopped_for_budget = True
                    break
                if round_number % cfg.eval_every == 0 or round_number == cfg.rounds:
                    with section("evaluation"):
                        last_eval = self.evaluate()
                    metrics.update(self._eval_metrics(last_eval))
                with section("metrics"):
                    round_times.append(time.perf_counter() - t0)
                    metrics["seconds"] = round_times[-1]
                    self.writer.append(metrics)
                    checkpoint = cfg.checkpoint_every and round_number % cfg.checkpoint_every == 0
                    if checkpoint and self.primary:
                        self._checkpoint()
                    bar.update(metrics, self.task.metric)
                round_done(time.perf_counter() - t0)
        finally:
            bar.close()
        if (
            cfg.checkpoint_every
            and self.primary
            and not crashed
            and self.checkpointed != state.round
        ):
            self._checkpoint()  # the end too, so a finished run can be extended
        statement = privacy_statement(
            cfg,
            self.spec,
            state.ledger.segments,
            state.noise.label,
            state.round,
            self.sampler.label,
            rounds_planned=self.rounds_planned,
        )
        summary = {
            "rounds_run": state.round,
            "stopped_for_budget": stopped_for_budget,
            "metric": self.task.metric,
            "initial": initial,
            "final": last_eval,
            "privacy": statement,
            "median_round_seconds": float(np.median(round_times)) if round_times else None,
            "wall_seconds": time.perf_counter() - self.started,
            "device": str(self.device),
            "ranks": self.ranks,
            "diagnostics_note": "diag_* metrics are exact counts and per-client statistics NOT "
            "covered by the DP guarantee (non-private diagnostics; off unless diagnostics = "
            "true)",
        }
        if self.eval_uses_private:
            summary["evaluation_note"] = (
                "eval_* metrics were computed with per-user private state (client-kept "
                "parameters or statistics trained on un-noised user data): non-private "
                "diagnostics, not covered by the DP guarantee"
            )
        elif self.eval_on_user_data:
            summary["evaluation_note"] = (
                "eval_* metrics were computed on utterances held out of the federated users' "
                "own data (test-split = 'utterance'): non-private diagnostics, not covered by "
                "the DP guarantee (test-split = 'speaker' keeps users' data out of the test set)"
            )
        self.writer.write_summary(summary)
        self.writer.write_model(state.weights())
        return summary


class _Progress:
    """A rich progress bar over rounds (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.bar.add_task("rounds", total=total, completed=done, info="")
            self.bar.start()

    def update(self, metrics: dict[str, Any], metric: str) -> None:
        if self.bar is None:
            return
        parts = []
        if f"eval_{metric}" in metrics:
            parts.append(f"{metric} {metrics[f'eval_{metric}']:.4f}")
        eps = [k for k in metrics if k.startswith("epsilon_")]
        if eps:  # the configured accountant's when it was computed, else RDP's
            parts.append(f"eps {metrics[eps[-1]]:.3g}")
        self.bar.update(self.task, advance=1, info="  ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
