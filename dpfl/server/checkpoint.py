"""Checkpoint files with a checksum: written to a temporary file with a SHA-256 of the payload
and renamed into place in one step, so a half-written or corrupted checkpoint is detected and
never loaded."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

_MAGIC = b"dpfl-checkpoint sha256 "


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with torch.save behind a header holding the SHA-256 of its bytes, to a
    temporary file renamed over ``path``: a crash at any moment leaves the old checkpoint or
    the new one, never a mix of one's data and the other's checksum."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    header = _MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(header + data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint after verifying its checksum; a corrupt or truncated file is an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise ValueError(f"checkpoint {path}: {err.strerror}: {err.filename}") from None
    if raw.startswith(_MAGIC) and b"\n" in raw[: len(_MAGIC) + 65]:
        end = raw.index(b"\n")
        expected, data = raw[len(_MAGIC) : end].decode("ascii", "replace"), raw[end + 1 :]
    else:
        raise ValueError(f"checkpoint {path} is not a dpfl checkpoint (no checksum header)")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(
            f"checkpoint {path} is corrupt or truncated (sha256 {actual[:12]}..., "
            f"expected {expected[:12]}...); refusing to load it"
        )
    return torch.load(io.BytesIO(data), weights_only=True)
