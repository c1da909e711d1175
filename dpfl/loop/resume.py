"""Resuming a run from its folder: the checkpoint checked against the config (only ``rounds``
may change, and only grow), the clients' own state, and the charge journal replayed so that no
attempt that was released is ever left uncharged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dpfl.config import ALIASES, RunConfig
from dpfl.loop.writer import CLIENT_STATE
from dpfl.privacy.accounting import PrivacyLedger
from dpfl.server.round import load_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
"""1: flat config keys; 2: the recipes' keys in their tables (``asr.size``)."""


def read_checkpoint(cfg: RunConfig, path: Path) -> dict[str, Any]:
    """The run folder's checkpoint, if its config matches this one. Only ``rounds`` may
    differ, and only grow: that extends the run (same noise, same ledger, same budget)."""
    ckpt = load_checkpoint(path)
    version = ckpt.get("format", 1)
    if version > CHECKPOINT_FORMAT:
        raise ValueError(
            f"cannot resume {cfg.run_dir}: its checkpoint has format {version}, newer than this "
            f"dpfl's {CHECKPOINT_FORMAT}; resume it with the dpfl that wrote it"
        )
    # format 1 (before the recipes' tables): flat key names, read through their aliases
    old = {ALIASES.get(key, key): value for key, value in ckpt["config"].items()}
    new = cfg.to_dict()
    defaults = RunConfig().to_dict()
    changed = [
        key for key in new if old.get(key, defaults.get(key)) != new[key] and key != "rounds"
    ] + [key for key in old if key not in new]
    if changed:
        shown = "; ".join(
            f"{key}: {old.get(key, defaults.get(key))!r} -> {new.get(key, '(gone)')!r}"
            for key in changed
        )
        raise ValueError(
            f"cannot resume {cfg.run_dir}: its checkpoint was written with a different "
            f"config ({shown}); only rounds may change, to extend the run"
        )
    done = ckpt["server"]["round"]
    if new["rounds"] != old["rounds"]:
        if new["rounds"] < max(old["rounds"], done):
            raise ValueError(
                f"config key rounds = {new['rounds']}: a resumed run can extend its "
                f"{old['rounds']} planned rounds, not shorten them"
            )
        if "noise" not in ckpt and cfg.dp_enabled:
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


def resume_run(run) -> None:
    """Load the checkpoint read at start-up into ``run`` (a FederatedRun), charge what ran after
    it, and give every rank rank 0's ledger."""
    ckpt = run.prior
    run.state.load_state_dict(ckpt["server"])
    if "eval_ledger" in ckpt:
        run.eval_ledger = PrivacyLedger.from_dict(ckpt["eval_ledger"])
    clients = Path(run.cfg.run_dir) / CLIENT_STATE
    if run.private and clients.exists():
        run.private_store = load_checkpoint(clients)
    # Rank 0 alone reads the journal and truncates the metrics; every rank takes its ledger.
    if run.primary:
        charge_replays(run)
    ledger = run.share(run.state.ledger.to_dict() if run.primary else None)
    run.state.ledger = PrivacyLedger.from_dict(ledger)
    log.info("resumed from round %d", run.state.round)


def charge_replays(run) -> None:
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
    spec, state = run.spec, run.state
    metric_lines = run.writer.truncate_after(state.round)
    if not spec.dp:
        return
    kept = state.ledger.rounds
    charged = spec.charged_noise_multiplier, spec.sample_rate
    journal = run.writer.read_charges(default=charged)
    extra = journal[kept:] if journal is not None else []
    trained = sum(kind == "train" for *_, kind in extra)
    if trained < metric_lines:  # an older folder, or a journal that lost lines
        extra += [(*charged, "train")] * (metric_lines - trained)
    if not extra:
        return
    if not state.noise.secure and not run.sampler.secure:
        run.writer.keep_charges(kept)
        log.info("reproducible run: the %d replayed attempts repeat exactly", len(extra))
        return
    for z, q, kind in extra:
        state.ledger.record(z, q, 1, *(spec.skellam if kind == "train" else (0.0, 0.0)))
        if kind == "eval":
            run.eval_ledger.record(z, q)
    log.warning("charging %d replayed attempts to the privacy budget", len(extra))
    if not state.noise.secure:
        state.noise.skip_to_fresh_streams()
        log.warning(
            "noise-seed with secret cohorts: the replayed rounds draw fresh noise (their old "
            "noise on other cohorts would release the difference of two sums unnoised)"
        )
