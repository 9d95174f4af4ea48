"""Corrupt samples: an error naming the file, or, with ``skip_corrupt``, skipped and counted.

:class:`CorruptSamples` is what a dataset keeps for that: ``skip(error, action)`` re-raises the
:class:`~datamodules.formats.images.CorruptFileError` unless skipping was asked for, and
otherwise logs it and adds one to a counter in shared memory, which the DataLoader workers (each
with its copy of the dataset) add to as well, so the DataModule's ``num_skipped`` sees them all
(without a lock: two workers counting at the same instant can miss one, which only the log then
shows). :meth:`CorruptSamples.read_or_replace` is the training-time rule: a corrupt sample is
replaced by a random other one, drawn from the dataset's augmentation generator so that a
resumed run draws the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils.data import default_collate

from datamodules.formats.images import CorruptFileError

log = logging.getLogger(__name__)

Sample = TypeVar("Sample")


class CorruptSamples:
    """The skip-and-count policy of one dataset (module docstring); ``what`` names its samples in
    the log ("training image", "video")."""

    def __init__(self, skip: bool, what: str, max_in_a_row: int = 100) -> None:
        self.skip_corrupt = skip
        self.what = what
        self.max_in_a_row = max_in_a_row
        self._count = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def count(self) -> int:
        return int(self._count)

    def skip(self, error: CorruptFileError, action: str) -> None:
        """Re-raise ``error`` unless skipping; else count it and log it with ``action``."""
        if not self.skip_corrupt:
            raise error
        self._count += 1
        log.warning("corrupt %s %s (%d skipped so far): %s", self.what, action, self.count, error)

    def read_or_replace(self, read: Callable[[int], Sample], i: int, size: int, generator: torch.Generator) -> Sample:
        """``read(i)``, or with skipping the read of a random other index in ``range(size)`` when
        sample ``i`` is corrupt; an error after ``max_in_a_row`` corrupt samples in a row."""
        for _ in range(self.max_in_a_row):
            try:
                return read(i)
            except CorruptFileError as error:
                self.skip(error, "replaced by a random one")
                i = int(torch.randint(size, (), generator=generator))
        raise RuntimeError(f"{self.max_in_a_row} corrupt {self.what}s in a row; is the dataset corrupt as a whole?")


def collate_dropping_skipped(samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """``default_collate`` of the evaluation samples that were read (a skipped corrupt one is
    None); None when none was, which the evaluation layer leaves out."""
    kept = [sample for sample in samples if sample is not None]
    return default_collate(kept) if kept else None
