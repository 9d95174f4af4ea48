"""What every visionzoo DataModule provides, and the named evaluation sets it serves.

:class:`VisionZooDataModule` is the base of every benchmark's DataModule. The command line and
the results writer rely on its members without defaults, so a DataModule that forgets one
fails when its class is defined (``benchmark``) or instantiated (the abstract members), naming
the member, instead of writing to a wrong run directory:

- ``benchmark``: the ``<benchmark>`` of ``runs/<benchmark>/<method>/<run name>``;
- ``run_name``: the default ``<run name>`` (the MVTec category, the UCF101 split ...);
- ``describe()``: what ``results.json`` records about the evaluated data;
- ``num_skipped``: corrupt samples skipped so far (``skip_corrupt``), 0 when none; the files
  left out at setup are listed in ``skipped_files`` (those skipped while loading are found by
  the evaluation, as the items no rank evaluated);
- ``eval_set_names(stage)``: the names of the eval sets of ``val`` or ``test``.

Evaluation datasets are served through :class:`EvalSet`, whose items carry ``eval_set`` and
``index``, so that metrics find their sets by name and the evaluation layer can drop the
repeats of a distributed sampler (``lightning_modules.distributed.indexed_outputs``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

from lightning import LightningDataModule
from torch.utils.data import Dataset


class EvalSet(Dataset):
    """An evaluation dataset whose items (dicts) gain ``eval_set`` = ``name`` and ``index`` = their
    position; an item that is None (a skipped corrupt sample) stays None. :meth:`item_name` names
    an item without reading it (its file), for reports of skipped ones."""

    def __init__(self, name: str, dataset: Dataset) -> None:
        self.name = name
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        return None if item is None else {**item, "eval_set": self.name, "index": index}

    def item_name(self, index: int) -> str:
        """The dataset's ``item_name(index)`` (a file path), else ``<eval set>#<index>``."""
        name = getattr(self.dataset, "item_name", None)
        return name(index) if name is not None else f"{self.name}#{index}"


class VisionZooDataModule(LightningDataModule, ABC):
    """Base of every benchmark's DataModule (module docstring)."""

    benchmark: str
    #: Whether ``visionzoo test`` takes checkpoints trained on another DataModule's data (a
    #: retrieval test set such as ROxford5k); otherwise that is an error naming both.
    tests_models_of_other_data: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.skipped_files: list[str] = []  # corrupt files left out when the data was set up

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        """``abstract=True`` marks a base shared by several benchmarks (no ``benchmark`` of its own)."""
        super().__init_subclass__(**kwargs)
        if not abstract and not isinstance(getattr(cls, "benchmark", None), str):
            raise TypeError(f"{cls.__name__} must set the class attribute `benchmark` (the <benchmark> of "
                            "runs/<benchmark>/<method>/<run name>), e.g. benchmark = 'mvtec'")

    @property
    @abstractmethod
    def run_name(self) -> str:
        """The default last component of the run directory."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What ``results.json`` records about the evaluated data (root, split, selectors)."""

    @property
    @abstractmethod
    def num_skipped(self) -> int:
        """Corrupt samples skipped so far (``skip_corrupt``)."""

    @abstractmethod
    def eval_set_names(self, stage: Literal["val", "test"]) -> list[str]:
        """Names of the eval sets that ``val_dataloader`` or ``test_dataloader`` serves."""
