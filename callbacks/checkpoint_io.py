"""Checkpoint files that are never half-written, with their model-parallel shards beside them.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint into memory and writes it through an
fsspec transaction, which stages it in the system temp folder and *moves* it into place: when
``/tmp`` is another filesystem than the run directory (a tmpfs, a node-local disk under a shared
run directory, the usual case on clusters) the move is a copy into the final path, and a job
killed during that copy leaves a truncated ``last.ckpt`` in place of the good one.
:class:`AtomicCheckpointIO` writes beside the target and renames, which POSIX makes atomic.

A checkpoint whose model-parallel tensors every rank wrote to shard files
(:mod:`lightning_modules.distributed.sharded_state`) gets them moved beside it first, and its
older shard folders are removed only once the new file is in place; loading resolves them, and
removing a checkpoint removes them too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_modules.distributed.sharded_state import SHARDS, atomic_torch_save, place_beside, remove_shards, resolve_beside
from lightning_modules.framework import is_local_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (:func:`atomic_torch_save`) and keep
    the shard files of model-parallel tensors beside the checkpoint; remote paths (``s3://`` …)
    keep Lightning's behaviour. ``visionzoo`` installs it unless the trainer config names
    another CheckpointIO."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not is_local_path(path):
            if SHARDS in checkpoint:
                raise ValueError(f"{path}: checkpoints with model-parallel shard files are written to local (or "
                                 "mounted) paths only")
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        older_shards = place_beside(checkpoint, path)
        atomic_torch_save(checkpoint, path)
        for folder in older_shards:
            shutil.rmtree(folder, ignore_errors=True)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(path, *args, **kwargs)
        resolve_beside(checkpoint, Path(path))
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if is_local_path(path):
            remove_shards(Path(path))
