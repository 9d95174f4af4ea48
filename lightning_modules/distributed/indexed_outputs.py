"""Indexed evaluation outputs: the per-sample rows of every rank, once each, in dataset order.

An evaluation step appends named tensors for the samples of its batch, together with each
sample's ``index`` in its eval set and the set's name (``eval_set``: ``test``, ``lfw``,
``gallery`` ...). At epoch end :meth:`IndexedOutputs.gather` collects the rows of every rank,
drops the repeats that ``DistributedSampler`` pads in (a padded sample is a repeat of one
already served, so it carries that sample's index) and returns each eval set's rows sorted by
index. The result equals what one process would have collected, whatever the world size and
however the samples were split over the ranks.

Rows are moved to the CPU as they are appended (an MVTec test set at full resolution holds
hundreds of MB of maps); the collective runs on the device the process group needs (CUDA for
NCCL). A rank that appended nothing (every batch skipped as corrupt) still takes part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_modules.distributed.comm import world_info

INDEX = "index"


def first_occurrences(index: Tensor) -> Tensor:
    """Positions of the first row of each distinct value of ``index``, ordered by that value."""
    unique, inverse = torch.unique(index, return_inverse=True)
    first = torch.full((len(unique),), len(index), dtype=torch.long)
    return first.scatter_reduce_(0, inverse, torch.arange(len(index)), reduce="amin")


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(rows: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, counts: list[int]) -> Tensor:
    """Every rank's ``rows`` (``counts[r]`` rows of trailing ``shape`` each), concatenated in rank order."""
    device = _collective_device()
    padded = torch.zeros((max(counts), *shape), dtype=dtype, device=device)
    if rows is not None and len(rows):
        padded[: len(rows)] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count].cpu() for part, count in zip(parts, counts)])


class IndexedOutputs:
    """Per-sample evaluation rows keyed by eval set and dataset index (module docstring)."""

    def __init__(self) -> None:
        self._parts: dict[str, list[dict[str, Tensor]]] = {}

    def append(self, eval_set: str | Sequence[str], index: Tensor | Sequence[int], **rows: Tensor) -> None:
        """Add the rows of one batch: ``eval_set`` is one name or one per sample, ``index`` [B],
        every value in ``rows`` is [B, ...]."""
        index = torch.as_tensor(index).long().cpu()
        names = [eval_set] * len(index) if isinstance(eval_set, str) else list(eval_set)
        for key, value in rows.items():
            if len(value) != len(index):
                raise ValueError(f"evaluation output {key!r} has {len(value)} rows for a batch of {len(index)} samples")
        rows = {key: value.detach().cpu() for key, value in rows.items()}
        for name in dict.fromkeys(names):
            selected = torch.tensor([n == name for n in names])
            part = {key: value[selected] for key, value in rows.items()} if not selected.all() else rows
            self._parts.setdefault(name, []).append({INDEX: index[selected], **part})

    def local(self) -> dict[str, dict[str, Tensor]]:
        """This rank's rows of each eval set, in the order appended (repeats kept)."""
        return {name: {key: torch.cat([p[key] for p in parts]) for key in parts[0]} for name, parts in self._parts.items()}

    def gather(self, across_ranks: bool = True) -> dict[str, dict[str, Tensor]]:
        """Each eval set's rows from every rank (``across_ranks``), one per index, sorted by index;
        ``index`` is among the returned keys. Eval sets are in order of their names."""
        local = self.local()
        if across_ranks and world_info()[1] > 1:
            local = self._all_ranks(local)
        ordered = {}
        for name in sorted(local):
            rows = local[name]
            keep = first_occurrences(rows[INDEX])
            ordered[name] = {key: value[keep] for key, value in rows.items()}
        return ordered

    @staticmethod
    def _all_ranks(local: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
        """Concatenate every rank's rows of every eval set; ranks exchange what they hold first
        (names, counts, trailing shapes and dtypes), so a rank without rows of a set joins in."""
        layout = {name: {key: (len(v), tuple(v.shape[1:]), v.dtype) for key, v in rows.items()} for name, rows in local.items()}
        layouts: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(layouts, layout)
        gathered = {}
        for name in sorted({name for layout in layouts for name in layout}):
            keys = next(layout[name] for layout in layouts if name in layout)
            counts = [next(iter(layout[name].values()))[0] if name in layout else 0 for layout in layouts]
            gathered[name] = {}
            for key, (_, shape, dtype) in keys.items():
                shapes = {layout[name][key][1:] for layout in layouts if name in layout and layout[name][key][0]}
                if len(shapes) > 1:
                    raise ValueError(f"evaluation output {key!r} of eval set {name!r} differs in shape or dtype "
                                     f"across ranks: {sorted(map(str, shapes))}")
                gathered[name][key] = _gather_rows(local.get(name, {}).get(key), shape, dtype, counts)
        return gathered

    def reset(self) -> None:
        self._parts = {}
