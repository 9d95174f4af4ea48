"""Serving whole sequences to the sequence evaluation loop (``lightning_modules.sequence_evaluation``):
one sequence a batch, each on exactly one rank.

- :class:`SequenceShards`: longest first, each sequence to the rank with the fewest frames so
  far. Lightning keeps a ``DistributedSampler`` as it is; ranks may get different counts (the
  loop has no collective per sequence).
- :func:`sequence_loader`: the loader over a dataset of sequence items (dataclasses with
  ``eval_set`` and ``index`` fields, set here), batches of one item.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lightning import Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.base import EvalSet
from datamodules.resumable import eval_loader


class SequenceShards(DistributedSampler):
    """Each sequence on exactly one rank (module docstring)."""

    def __init__(self, lengths: Sequence[int], num_replicas: int, rank: int) -> None:
        self.lengths, self.num_replicas, self.rank, self.epoch = list(lengths), num_replicas, rank, 0
        load = [0] * num_replicas
        shares: list[list[int]] = [[] for _ in range(num_replicas)]
        for index in sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], i)):
            target = min(range(num_replicas), key=lambda r: (load[r], r))
            shares[target].append(index)
            load[target] += self.lengths[index]
        self.indices = shares[rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _IndexedSequences(EvalSet):
    """An EvalSet whose items (sequence dataclasses) carry their set name and index."""

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        item.eval_set, item.index = self.name, index
        return item


def _one_sequence(items: list[Any]) -> Any:
    """Batches of one sequence are the sequence itself."""
    if len(items) != 1:
        raise ValueError("sequence evaluation batches hold one sequence (batch_size 1)")
    return items[0]


def sequence_loader(name: str, dataset: Dataset, lengths: Sequence[int], trainer: Trainer | None, num_workers: int) -> DataLoader:
    """The eval set ``name`` of whole sequences, this rank's share (:class:`SequenceShards`)."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    return eval_loader(_IndexedSequences(name, dataset), batch_size=1, sampler=SequenceShards(lengths, world, rank),
                       collate_fn=_one_sequence, num_workers=num_workers, persistent_workers=False)
