"""Checkpoints of model-parallel tensors as per-rank files: no rank ever holds a whole head.

A model-parallel head (class centres sharded over the ranks, and their optimizer state) is kept
out of the checkpoint file. Instead:

1. **Save** (every rank, from the module's ``on_save_checkpoint``, :func:`write_shards`): each
   rank writes the rows it owns, with their range ``[start, stop)`` of the full tensor, to
   ``<run dir>/.shards-<token>/rank<r>-of-<W>.pt`` (atomically), then waits for every rank. The
   checkpoint dict gets a small descriptor under :data:`SHARDS` in their place.
2. **Place** (rank 0, its CheckpointIO, :func:`place_beside`): the staged folder is renamed to
   ``<checkpoint>.shards-<token>`` beside the checkpoint file, the descriptor names it, the
   checkpoint file is written atomically, and only then are the checkpoint's older shard folders
   removed. A kill at any moment leaves a checkpoint file whose shard folder exists and is whole.
3. **Load** (every rank, :func:`read_checkpoint` then :func:`read_rows`): the descriptor's folder
   is resolved beside the checkpoint; each rank memory-maps the files whose ranges overlap its
   own slice and copies only those rows, so a checkpoint of W ranks resumes on any number of
   ranks and a rank reads no more than its slice into memory.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_modules.distributed.comm import all_gather_objects, world_info

SHARDS = "sharded_tensors"  # the checkpoint key of the descriptor


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
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):
            _raise_if_disk_full(error, path)
        raise
    _fsync_directory(path.parent)  # make the rename itself durable
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        stale.unlink(missing_ok=True)


def _raise_if_disk_full(error: BaseException, path: Path) -> None:
    """A write that failed for want of space says so, naming the file: torch's own error is an
    ``inline_container.cc`` message whose cause (ENOSPC) is buried in the traceback."""
    free = shutil.disk_usage(path.parent).free
    if getattr(error, "errno", None) == errno.ENOSPC or free < (64 << 20) or "No space left" in str(error):
        raise OSError(errno.ENOSPC, f"No space left on device while writing {path} ({free >> 20} MiB free on its "
                                    "filesystem); the previous file there is untouched. Free space, or point the run "
                                    "directory elsewhere (--trainer.default_root_dir)", str(path)) from None


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ------------------------------------------------------------------------------------ save


def write_shards(tensors: dict[str, Tensor], start: int, num_rows: int, run_dir: str | Path, step: int) -> dict[str, Any]:
    """Write this rank's rows ``[start, start + len)`` of the full ``[num_rows, ...]`` tensors
    ``tensors`` (all with the same rows) and wait for every rank (a collective). Returns the
    descriptor to store in the checkpoint under :data:`SHARDS`."""
    rank, world_size = world_info()
    token = f"step{step}-{all_gather_objects(uuid.uuid4().hex[:8])[0]}"  # rank 0's: one folder for every rank
    stop = start + len(next(iter(tensors.values())))
    staging = Path(run_dir) / f".shards-{token}"
    atomic_torch_save({"start": start, "stop": stop, **{k: v.detach().cpu() for k, v in tensors.items()}},
                      staging / f"rank{rank}-of-{world_size}.pt")
    ranges = all_gather_objects((start, stop))  # also the barrier: every file is whole after it
    covered = sorted(ranges)
    if covered[0][0] != 0 or covered[-1][1] != num_rows or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise ValueError(f"the ranks' row ranges {covered} do not tile the {num_rows} rows of {sorted(tensors)}")
    return {"num_rows": num_rows, "names": sorted(tensors), "staging": str(staging),
            "files": [f"rank{r}-of-{world_size}.pt" for r in range(world_size)], "ranges": ranges}


def place_beside(checkpoint: dict[str, Any], path: Path) -> list[Path]:
    """Rank 0, before writing ``checkpoint`` to ``path``: move its staged shard folder to
    ``<path>.shards-<token>`` and name it in the descriptor. Returns the older shard folders of
    ``path``, to remove once the checkpoint file is in place."""
    descriptor = checkpoint.get(SHARDS)
    if descriptor is None:
        return []
    staging = Path(descriptor.pop("staging"))
    final = path.with_name(f"{path.name}.shards{staging.name.removeprefix('.shards')}")
    if staging != final:
        shutil.rmtree(final, ignore_errors=True)
        shutil.move(staging, final)
        _fsync_directory(final.parent)
    descriptor["folder"] = final.name
    for abandoned in staging.parent.glob(".shards-*"):  # staged by a save that was killed before this one
        shutil.rmtree(abandoned, ignore_errors=True)
    return [old for old in path.parent.glob(f"{path.name}.shards-*") if old != final]


def remove_shards(path: Path) -> None:
    """Remove the shard folders of the checkpoint ``path`` (with the checkpoint itself)."""
    for folder in path.parent.glob(f"{path.name}.shards-*"):
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------ load


def read_checkpoint(path: str | Path, **load_options: Any) -> dict[str, Any]:
    """``torch.load(path)`` with its shard folder resolved, for :func:`read_rows`."""
    path = Path(path)
    checkpoint = torch.load(path, **{"map_location": "cpu", **load_options})
    resolve_beside(checkpoint, path)
    return checkpoint


def resolve_beside(checkpoint: dict[str, Any], path: Path) -> None:
    """Name the checkpoint's shard folder by its full path (it is stored relative to ``path``)."""
    descriptor = checkpoint.get(SHARDS) if isinstance(checkpoint, dict) else None
    if descriptor is not None:
        descriptor["folder"] = str(path.absolute().parent / Path(descriptor["folder"]).name)


def read_rows(descriptor: dict[str, Any], start: int, stop: int) -> dict[str, Tensor]:
    """Rows ``[start, stop)`` of every sharded tensor, from the files that hold them."""
    if "folder" not in descriptor or not Path(descriptor["folder"]).is_absolute():
        raise ValueError("this checkpoint keeps its model-parallel tensors in shard files beside it: load it through "
                         "visionzoo (--ckpt_path) or lightning_modules.distributed.sharded_state.read_checkpoint")
    parts: dict[str, list[Tensor]] = {name: [] for name in descriptor["names"]}
    for name, (first, last) in zip(descriptor["files"], descriptor["ranges"]):
        low, high = max(start, first), min(stop, last)
        if low >= high:
            continue
        file = Path(descriptor["folder"]) / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: a shard of the checkpoint's model-parallel tensors is missing")
        shard = torch.load(file, map_location="cpu", mmap=True, weights_only=True)  # pages in only the rows copied
        for key in parts:
            parts[key].append(shard[key][low - first : high - first].clone())
    return {key: torch.cat(values) for key, values in parts.items()}
