"""The run folder: the config, metrics as JSON lines, the charge journal, checkpoints, the
summary and the final model. Every way of running writes the same folder."""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import torch

from dpfl.config import RunConfig


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
        self._lock: str | None = None
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"config key run-dir = {str(run_dir)!r} is a file, not a folder")
        if resume:
            if not self.checkpoint_path.is_file():
                raise ValueError(
                    f"cannot resume: {self.dir} holds no checkpoint.pt (a run checkpoints with "
                    "checkpoint-every > 0)"
                )
            if enabled:
                self._take_lock()
            return
        if not enabled:
            return  # rank 0 checks (and may clear) the folder
        if self.dir.is_dir():
            self._take_lock()  # before looking: another process may be writing this run
        found = [name for name in self.RUN_FILES if (self.dir / name).exists()]
        if found and not overwrite:
            raise ValueError(
                f"the run folder {self.dir} already holds a run ({', '.join(found)}): continue it "
                "with --resume, replace it with --overwrite, or choose another run-dir"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._take_lock()
        for name in found:
            (self.dir / name).unlink()

    _held: dict[str, list] = {}  # folders this process holds: [file, holders]

    def _take_lock(self) -> None:
        """Hold the folder's lock while this run writes it: a second process (a ServerApp that
        outlived a SuperLink crash, a resume started twice) is refused instead of interleaving
        two runs in one ledger. The operating system drops the lock when the process dies; within
        one process the lock is shared (the caller owns its own sequencing)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        key = str(self.dir.resolve())
        if key in RunWriter._held:
            RunWriter._held[key][1] += 1
            self._lock = key
            return
        fh = (self.dir / ".lock").open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise ValueError(
                f"the run folder {self.dir} is in use by {owner}: one process writes a run at a "
                "time (stop the other, or choose another run-dir)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        RunWriter._held[key] = [fh, 1]
        self._lock = key

    def close(self) -> None:
        """Release the folder (the end of the run, or of a process that stops writing it)."""
        if self._lock is None:
            return
        key, self._lock = self._lock, None
        held = RunWriter._held.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] == 0:
                held[0].close()
                del RunWriter._held[key]

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

    def record_charge(
        self, round_number: int, attempt: int, z: float, q: float, kind: str = "train"
    ) -> None:
        """One charged release (a training attempt, or a federated evaluation: ``kind``),
        written and flushed to disk before anything it produced is released (a metric line, a
        checkpoint, the model sent to the next cohort), so a crash can never lose a charge."""
        if not self.enabled:
            return
        row = {"round": round_number, "attempt": attempt, "noise_multiplier": z, "sample_rate": q}
        line = json.dumps({**row, **({"kind": kind} if kind != "train" else {})})
        with self.charges_path.open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_charges(self, default: tuple[float, float]) -> list[tuple[float, float, str]] | None:
        """The charged releases as (z, q, kind), or None when the folder has no journal. A torn
        last line (a crash mid-write) counts, at ``default`` (a training attempt): the charge
        may have been meant."""
        if not self.charges_path.exists():
            return None
        out = []
        for line in self.charges_path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                z, q = float(row["noise_multiplier"]), float(row["sample_rate"])
                out.append((z, q, str(row.get("kind", "train"))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                out.append((*default, "train"))
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
