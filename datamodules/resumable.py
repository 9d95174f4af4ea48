"""Training loaders that resume mid-epoch exactly.

Exact resume needs three things from the data path, all provided here:

- **Data order.** :func:`resumable_train_loader` returns torchdata's ``StatefulDataLoader``;
  Lightning stores its ``state_dict`` in every checkpoint and restores it on resume, so a run
  restarted mid-epoch continues with the next unseen batch. The order is a function of the
  run's seed (:func:`torch.initial_seed`) and the epoch, never of the global RNG, so building
  the loader on resume does not shift the model's random stream. (A sampler drawing from a
  generator shared with the loader's worker seeds, torchdata's default, gave a different
  order in the epoch after a resume.)
- **Worker seeds.** The workers' ``base_seed`` is part of the loader state.
- **The global RNG.** No loader draws from it: a DataLoader without a generator draws its
  worker seed from the global RNG each time it starts an iterator, which a loader with
  persistent workers does once per run and a resumed run does again (:func:`eval_loader`).
- **Augmentation randomness.** Each worker draws from a generator owned by its dataset copy
  (:class:`AugmentationRNG`), seeded from the worker's seed, and the dataset's ``state_dict``
  (the generator state) travels with the loader's worker snapshots. Datasets must draw every
  random number from :attr:`AugmentationRNG.generator`, never from ``torch.rand`` or ``random``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning import Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader


class AugmentationRNG:
    """Mixin for map-style datasets: a generator for augmentation randomness whose state is the
    dataset's ``state_dict`` (torchdata's ``Stateful`` protocol), so ``StatefulDataLoader``
    checkpoints it per worker. Seeded lazily from the DataLoader worker's seed (``base_seed +
    worker id``), or from the process's initial seed without workers."""

    _generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            worker = get_worker_info()
            self._generator = torch.Generator().manual_seed(worker.seed if worker else torch.initial_seed())
        return self._generator

    def draw_seed(self) -> int:
        """A seed drawn from :attr:`generator`, for libraries with their own RNG (albumentations)."""
        return int(torch.randint(2**63 - 1, (), generator=self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def loader_options(batch_size: int, num_workers: int) -> dict[str, Any]:
    """The DataLoader options every visionzoo loader shares: workers kept alive across epochs,
    pinned memory when a GPU is there."""
    return {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
    }


class EpochInIndexSampler(DistributedSampler):
    """A ``DistributedSampler`` whose indices carry the epoch: ``epoch · len(dataset) + i``, for
    datasets whose samples change with the epoch (DAVIS's growing temporal skip) in every
    DataLoader worker, persistent or not, and on resume (:func:`split_epoch_index`)."""

    def __iter__(self):
        offset = self.epoch * len(self.dataset)  # type: ignore[arg-type]
        return (offset + i for i in super().__iter__())


def split_epoch_index(index: int, size: int) -> tuple[int, int]:
    """(epoch, dataset index) of an :class:`EpochInIndexSampler` index."""
    return divmod(index, size)


def resumable_train_loader(
    dataset: Dataset, trainer: Trainer | None, drop_last: bool, epoch_in_index: bool = False, **loader_options: Any
) -> StatefulDataLoader:
    """A shuffling ``StatefulDataLoader`` over this rank's share of ``dataset``, or over all of it
    when the method does not shard its training data (``VisionZooModule.shards_training_data``).

    The order is a ``DistributedSampler``'s (one replica without a trainer or DDP): a function
    of the run's seed and the epoch only, which Lightning keeps (it does not replace a
    ``DistributedSampler``) and sets each epoch; a resumed loader fast-forwards through it.
    Worker seeds come from a generator of their own; ``loader_options`` go to the loader. With
    ``epoch_in_index`` the indices carry the epoch (:class:`EpochInIndexSampler`).
    """
    sharded = trainer is not None and getattr(trainer.lightning_module, "shards_training_data", True)
    world_size, rank = (trainer.world_size, trainer.global_rank) if sharded else (1, 0)
    sampler = (EpochInIndexSampler if epoch_in_index else DistributedSampler)(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=torch.initial_seed(), drop_last=drop_last
    )
    generator = torch.Generator().manual_seed(torch.initial_seed())
    with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function on every construction
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(dataset, sampler=sampler, drop_last=drop_last, generator=generator, **loader_options)


def eval_loader(dataset: Dataset, **loader_options: Any) -> DataLoader:
    """An evaluation ``DataLoader`` (fixed order) whose worker seeds come from its own generator,
    so that starting it never moves the global RNG; ``loader_options`` go to the loader."""
    return DataLoader(dataset, shuffle=False, generator=torch.Generator().manual_seed(0), **loader_options)
