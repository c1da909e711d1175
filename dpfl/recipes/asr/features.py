"""A speech corpus's log-mel features, computed once per utterance and kept on disk.

Decoding, resampling and the log-mel transform of an utterance cost more than a training step
of a small model on it; a federation of thousands of speakers samples each one again and again,
more than a cache of decoded audio can hold. The store computes the features of an utterance on
first use (or ahead of time: ``dpfl speech-corpus DIR --cache``) and keeps them in two files:

* ``features.f32``: the frames of every stored utterance, float32 rows of ``N_MELS`` values
  (the model front-end's output, normalised per utterance), appended one utterance after another
  and read back through a NumPy memory map;
* ``index.jsonl``: one JSON line per utterance: the audio file's absolute path, size and
  modification time (ns), where its rows start, how many frames and audio samples it has.

An utterance's entry is valid only while its file has the recorded size and mtime: a changed
file is read again and appended anew (the last entry of a path wins). Appends hold an exclusive
``flock`` (processes of one machine, e.g. a deployment's nodes, share a store), write the rows,
flush them, then the index lines; a reader trusts an index entry only when its rows lie within
the features file. A store cut short (a crash between the two writes, a truncated copy, a
malformed last line) is detected when opened: the entries beyond what survives are dropped and
the files are cut back to the last whole utterance, which is then recomputed on use.

The folder name holds a hash of the front-end's parameters (sample rate, mels, window, hop,
normalisation), so features of another front-end never mix. Written by hand: no maintained
package offers an append-safe array store keyed by source files (a ``datasets`` Arrow cache is
keyed by the fingerprint of a whole transform and rebuilt whole when one file changes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpfl.models.asr.models import N_MELS, SAMPLE_RATE, LogMelFrontend

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_BYTES = N_MELS * 4


@dataclass(frozen=True)
class Entry:
    """Where one utterance's frames are in the store."""

    offset: int
    """First row in ``features.f32``."""
    frames: int
    samples: int
    """Audio samples at 16 kHz (its duration)."""


def frontend_key(frontend: LogMelFrontend) -> dict:
    """What the stored features depend on: a different value means different features."""
    mel = frontend.mel
    return {
        "format": FORMAT_VERSION,
        "sample_rate": SAMPLE_RATE,
        "n_mels": mel.n_mels,
        "n_fft": mel.n_fft,
        "win_length": mel.win_length,
        "hop": frontend.hop,
        "normalise": "per-utterance mean and variance over its own frames",
    }


def utterance_features(frontend: LogMelFrontend, wave: torch.Tensor) -> np.ndarray:
    """One utterance's features as the model's front-end computes them in a batch: (frames,
    N_MELS) float32 (only frames whose window lies inside the utterance, as there)."""
    with torch.no_grad():
        feats, frames = frontend(wave[None].float(), torch.tensor([len(wave)]))
    return feats[0, :, : int(frames[0])].T.contiguous().numpy()


def default_folder(data_dir: str | Path) -> Path:
    """``<data_dir>/.dpfl-features`` where the corpus folder is writable, else a folder in the
    user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``) named by the corpus's absolute path."""
    data_dir = Path(data_dir).resolve()
    if os.access(data_dir, os.W_OK):
        return data_dir / ".dpfl-features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return base / "dpfl" / "features" / f"{data_dir.name}-{name}"


class FeatureStore:
    """The features of one corpus (see the module's docstring). ``folder``: where the store's
    files live (created); one store per front-end configuration inside it."""

    def __init__(self, folder: str | Path, frontend: LogMelFrontend | None = None) -> None:
        self.frontend = frontend or LogMelFrontend()
        key = frontend_key(self.frontend)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(folder) / f"logmel-{digest}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"feature store {self.folder}: cannot create it ({err.strerror}); set "
                "asr.feature-cache to a writable folder, or 'off' to decode audio on each use"
            ) from None
        meta = self.folder / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
        self.data_path = self.folder / "features.f32"
        self.index_path = self.folder / "index.jsonl"
        self.entries: dict[str, tuple[int, int, Entry]] = {}
        """path -> (size, mtime_ns, entry): the last valid entry of each audio file."""
        self.rows = 0
        """Rows of ``features.f32`` that valid entries account for."""
        self.repaired = 0
        """Entries dropped when the store was found cut short (see :meth:`_read`)."""
        self._array: np.memmap | None = None
        self._index_bytes = 0
        with self._locked():
            self._read(repair=True)

    # --- reading ---------------------------------------------------------------------------

    def _read(self, repair: bool = False) -> None:
        """Load the index from the start; with ``repair`` (lock held) cut both files back to
        their last whole utterance when they do not agree."""
        data_rows = self.data_path.stat().st_size // ROW_BYTES if self.data_path.exists() else 0
        raw = self.index_path.read_bytes() if self.index_path.exists() else b""
        entries: dict[str, tuple[int, int, Entry]] = {}
        rows = good_bytes = dropped = 0
        for line in raw.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline: a write cut short")
                rec = json.loads(line)
                entry = Entry(int(rec["offset"]), int(rec["frames"]), int(rec["samples"]))
                size, mtime = int(rec["size"]), int(rec["mtime_ns"])
                if (
                    entry.offset != rows
                    or entry.frames < 1
                    or entry.offset + entry.frames > data_rows
                ):
                    raise ValueError("rows missing from features.f32")
            except (ValueError, KeyError, TypeError):
                dropped = sum(1 for _ in raw[good_bytes:].splitlines())
                break
            entries[rec["path"]] = (size, mtime, entry)
            rows = entry.offset + entry.frames
            good_bytes += len(line)
        if repair and (dropped or data_rows != rows or data_rows * ROW_BYTES != self._size()):
            log.warning(
                "feature store %s was cut short (%d index line(s) unusable, %d of %d feature rows "
                "accounted for): cut back to its last whole utterance; the rest is recomputed",
                self.folder,
                dropped,
                rows,
                data_rows,
            )
            with open(self.data_path, "ab") as fh:
                fh.truncate(rows * ROW_BYTES)
            with open(self.index_path, "ab") as fh:
                fh.truncate(good_bytes)
            self.repaired += dropped
        self.entries, self.rows, self._index_bytes = entries, rows, good_bytes
        self._array = None

    def _size(self) -> int:
        return self.data_path.stat().st_size if self.data_path.exists() else 0

    def array(self) -> np.ndarray:
        """The stored rows, (rows, N_MELS) float32, memory-mapped (private: never written)."""
        if self._array is None or len(self._array) < self.rows:
            if self.rows == 0:
                return np.zeros((0, N_MELS), dtype=np.float32)
            # copy-on-write: writable views for torch.from_numpy; nothing is ever written back
            self._array = np.memmap(self.data_path, np.float32, "c", shape=(self.rows, N_MELS))
        return self._array

    def lookup(self, audio: Path) -> Entry | None:
        """The stored entry of ``audio`` while the file is unchanged, else None."""
        found = self.entries.get(str(Path(audio).resolve()))
        if found is None:
            return None
        try:
            st = os.stat(audio)
        except FileNotFoundError:
            return None  # loading it says so, clearly
        size, mtime, entry = found
        return entry if (st.st_size, st.st_mtime_ns) == (size, mtime) else None

    # --- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        with open(self.folder / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def entries_for(self, audio_files: list[Path], load) -> list[Entry]:
        """The entries of ``audio_files``, computing and appending the missing or stale ones
        (``load(path) -> 16 kHz mono waveform``) under the store's lock."""
        out = [self.lookup(a) for a in audio_files]
        if all(e is not None for e in out):
            return out  # type: ignore[return-value]
        with self._locked():
            if self._size() != self.rows * ROW_BYTES or self._index_changed():
                self._read(repair=True)  # another process appended, or the store was damaged
            out = [self.lookup(a) for a in audio_files]
            lines, blocks, at = [], [], self.rows
            for i, audio in enumerate(audio_files):
                if out[i] is not None:
                    continue
                path = Path(audio)
                st = os.stat(path)
                wave = load(path)
                feats = utterance_features(self.frontend, wave)
                key = str(path.resolve())
                entry = Entry(at, len(feats), len(wave))
                record = {"path": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                record.update(offset=at, frames=len(feats), samples=len(wave))
                lines.append(json.dumps(record))
                blocks.append(feats)
                at += len(feats)
                out[i] = entry
                self.entries[key] = (st.st_size, st.st_mtime_ns, entry)
            with open(self.data_path, "ab") as fh:  # the rows first: an index line never
                for block in blocks:  # points at rows that are not on disk
                    fh.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
                fh.flush()
                os.fsync(fh.fileno())
            data = ("\n".join(lines) + "\n").encode()
            with open(self.index_path, "ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self.rows, self._index_bytes = at, self._index_bytes + len(data)
        return out  # type: ignore[return-value]

    def _index_changed(self) -> bool:
        size = self.index_path.stat().st_size if self.index_path.exists() else 0
        return size != self._index_bytes
