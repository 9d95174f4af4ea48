"""Checkpoint files that are never half-written.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint into memory and writes it through an
fsspec transaction, which stages it in the system temp folder and *moves* it into place: when
``/tmp`` is another filesystem than the run directory (a tmpfs, a node-local disk under a shared
run directory, the usual case on clusters) the move is a copy into the final path, and a job
killed during that copy leaves a truncated ``last.ckpt`` in place of the good one.
:class:`AtomicCheckpointIO` writes beside the target and renames, which POSIX makes atomic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through ``.<name>.<pid>.partial`` in the same folder, flushed to
    disk and renamed over ``path``: a reader sees the old file or the new one, never a part.
    Partial files left by earlier killed writers of ``path`` are removed once the save succeeded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (:func:`atomic_torch_save`); remote
    paths (``s3://`` …) keep Lightning's behaviour. ``visionzoo`` installs it unless the trainer
    config names another CheckpointIO."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, Path(path))
