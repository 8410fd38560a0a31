"""Checkpoint files that are never half-written, and finding the one to resume from."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same (existing) folder, fsync, then rename over `path`.

    A crash at any moment leaves either the previous file or the new one, never a truncated one. A missing folder is
    not made again (FileNotFoundError: a run directory removed mid-run stays removed); a failed write is an OSError
    naming `path` (ENOSPC when the disk is full), not torch's opaque RuntimeError.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else err.__context__  # torch.save hides it behind a RuntimeError
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror, str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes through `atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a (re)started run continues from: the newest readable one in `checkpoints/` (normally
    `last.ckpt`). A file that cannot be loaded (truncated by a crash outside `atomic_torch_save`, bit rot) is
    reported and skipped in favour of the next newest."""
    folder = run_dir / "checkpoints"
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)
    for path in candidates:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... on damaged files
            warnings.warn(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); skipping it", stacklevel=2)
            continue
        return path
    return None
