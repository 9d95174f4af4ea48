"""Landmark retrieval data: Google Landmarks v2 (training and its retrieval split) and the
revisited Oxford/Paris test sets (benchmarks.md §6).

:class:`RetrievalDataModule` is what both share: images read, transformed and served as eval sets
(a query set and a gallery set, :class:`~datamodules.base.EvalSet`), and the
:class:`~benchmarks.metrics.retrieval.RetrievalProtocol` that scores them
(:meth:`RetrievalDataModule.retrieval_protocol`). Transforms are those of the RACT code
(binjiezhang/RACT_ICLR2022 ``data_loader/data_loaders.py``, the reference of the compatibility
methods): training ``RandomResizedCrop(image_size)`` (area 0.08-1) and a horizontal flip; test a
resize to ``image_size``², queries and gallery alike; ImageNet normalisation.

GLDv2 (``cvdfoundation/google-landmark``, dataset v2.1), under ``root``:

- ``train_clean.csv`` (``landmark_id,images``, GLDv2-clean) or ``train.csv`` (``id,url,landmark_id``),
  images at ``train/<a>/<b>/<c>/<id>.jpg`` (a, b, c: the id's first three characters). Landmark
  ids are remapped to 0..C-1 in increasing order; the mapping is written to
  ``<run dir>/label_map.json`` and kept in checkpoints (the DataModule's state), so that a later
  model (BCT) can match its classes to an old model's.
- Retrieval evaluation: ``index.csv`` gallery at ``index/…``, queries at ``test/…``, ground truth
  ``retrieval_solution_v2.1.csv``: Public and Private scored apart, Ignored queries dropped.
- Listed training images missing on disk (partial downloads) are an error giving how many and
  the first few; ``skip_missing: true`` leaves them out and logs the count.

Revisited Oxford/Paris (filipradenovic/revisitop), under ``root``: ``<dataset>/gnd_<dataset>.pkl``
and ``<dataset>/jpg/<name>.jpg``; queries cropped to their ``bbx`` before extraction and never in
the database; with ``distractors: true`` the ``revisitop1m/revisitop1m.txt`` images
(``revisitop1m/jpg/<name>``) appended to the database (R1M).
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
from abc import abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmarks.metrics.retrieval import SPLITS, GLDv2Protocol, RetrievalProtocol, RevisitedProtocol, csv_rows, read_solution
from datamodules.base import EvalSet, VisionZooDataModule
from datamodules.clips import as_clip, to_model_input, train_clip
from datamodules.corrupt import CorruptSamples, collate_dropping_skipped
from datamodules.formats.images import CorruptFileError, read_image
from datamodules.layout import layout_error
from datamodules.resumable import AugmentationRNG, eval_loader, loader_options, resumable_train_loader

log = logging.getLogger(__name__)

LABEL_MAP = "label_map.json"
#: The training images of an old/new split (``class_fraction`` or ``image_fraction`` < 1), in the run directory.
TRAINING_SPLIT = "training_split.csv"
MISSING_LISTED = 5


def train_image(image: np.ndarray, size: int, generator: torch.Generator, scale: tuple[float, float]) -> Tensor:
    """RandomResizedCrop(size, scale) and a horizontal flip of an (H, W, 3) uint8 image → [3, size, size]."""
    return train_clip(image[None], size, generator, scale)[:, 0]


def evaluation_image(image: np.ndarray, size: int) -> Tensor:
    """The image resized to size² (RACT's ``Resize([size, size])``) → [3, size, size]."""
    return to_model_input(TF.resize(as_clip(image[None]), [size, size], antialias=True))[:, 0]


def hashed_path(root: Path, split: str, identifier: str) -> Path:
    """``<root>/<split>/<a>/<b>/<c>/<id>.jpg``."""
    return root / split / identifier[0] / identifier[1] / identifier[2] / f"{identifier}.jpg"


class LandmarkTrainingImages(AugmentationRNG, Dataset):
    """Training images with their class: ``image`` [3, S, S], ``label``, ``index``. A corrupt image
    is an error naming it, or with ``skip_corrupt`` replaced by a random other one and counted."""

    def __init__(self, samples: Sequence[tuple[Path, int]], image_size: int, crop_scale: tuple[float, float],
                 skip_corrupt: bool) -> None:
        self.samples, self.image_size, self.crop_scale = samples, image_size, tuple(crop_scale)
        self.corrupt = CorruptSamples(skip_corrupt, "training image")

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, i: int) -> tuple[np.ndarray, int, int]:
        path, label = self.samples[i]
        return read_image(path), label, i

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label, index = self.corrupt.read_or_replace(self._read, i, len(self), self.generator)
        return {"image": train_image(image, self.image_size, self.generator, self.crop_scale), "label": label, "index": index}


class RetrievalImages(Dataset):
    """Evaluation images (``image`` [3, S, S], ``path``), each optionally cropped to its box
    (x1, y1, x2, y2) first. A corrupt image is an error naming it, or with ``skip_corrupt``
    None (left out of its batch and counted)."""

    def __init__(self, paths: Sequence[Path], image_size: int, skip_corrupt: bool,
                 boxes: Optional[Sequence[Sequence[float]]] = None) -> None:
        self.paths, self.image_size, self.boxes = list(paths), image_size, boxes
        self.corrupt = CorruptSamples(skip_corrupt, "image")

    def __len__(self) -> int:
        return len(self.paths)

    def item_name(self, i: int) -> str:
        return str(self.paths[i])

    def __getitem__(self, i: int) -> Optional[dict[str, Any]]:
        try:
            image = read_image(self.paths[i])
        except CorruptFileError as error:
            self.corrupt.skip(error, "left out")
            return None
        if self.boxes is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in self.boxes[i])
            image = image[max(y1, 0) : y2, max(x1, 0) : x2]
        return {"image": evaluation_image(image, self.image_size), "path": str(self.paths[i])}


class RetrievalDataModule(VisionZooDataModule, abstract=True):
    """Base of the retrieval DataModules (module docstring): subclasses set the eval sets
    (:meth:`eval_sets`, query set first) and :meth:`retrieval_protocol`; GLDv2 also trains."""

    def __init__(self, root: str, image_size: int, batch_size: int, num_workers: int, skip_corrupt: bool) -> None:
        super().__init__()
        self.root = Path(root)
        self.image_size, self.batch_size, self.num_workers, self.skip_corrupt = image_size, batch_size, num_workers, skip_corrupt
        self._eval_sets: dict[str, RetrievalImages] = {}

    @abstractmethod
    def eval_sets(self) -> dict[str, RetrievalImages]:
        """The query and gallery sets by name, built once (``setup``)."""

    @abstractmethod
    def retrieval_protocol(self) -> RetrievalProtocol:
        """The ground truth of the eval sets and how it scores rankings."""

    @property
    def num_skipped(self) -> int:
        return sum(dataset.corrupt.count for dataset in self._eval_sets.values())

    def evaluation_images(self, paths: Sequence[Path]) -> RetrievalImages:
        """Any images at the test-time transform (BCT's pass of the old model over training images)."""
        return RetrievalImages(paths, self.image_size, self.skip_corrupt)

    def eval_set_names(self, stage: Literal["val", "test"]) -> list[str]:
        return list(self.eval_sets())

    def val_dataloader(self) -> list[DataLoader]:
        options = loader_options(self.batch_size, self.num_workers)
        return [eval_loader(EvalSet(name, dataset), collate_fn=collate_dropping_skipped, **options)
                for name, dataset in self.eval_sets().items()]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        """``visionzoo predict`` embeds the eval sets."""
        return self.val_dataloader()


def read_training_list(path: Path) -> list[tuple[str, int]]:
    """(image id, landmark id) of ``train_clean.csv`` (``landmark_id,images``) or ``train.csv``
    (``id,url,landmark_id``), by the header."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    clean = "images" in header
    samples = []
    for line, row in csv_rows(path, ("landmark_id", "images") if clean else ("id", "landmark_id")):
        try:
            landmark = int(row["landmark_id"])
        except ValueError:
            raise ValueError(f"{path} line {line}: landmark_id must be an integer; got {row['landmark_id']!r}") from None
        ids = row["images"].split() if clean else [row["id"]]
        samples += [(identifier, landmark) for identifier in ids]
    return samples


class GLDv2DataModule(RetrievalDataModule):
    """Google Landmarks v2 (module docstring). ``train_file``: ``train_clean.csv`` (GLDv2-clean) or
    ``train.csv``; ``class_fraction`` < 1 trains on the first fraction of the landmarks by id and
    ``image_fraction`` < 1 on the first fraction of each landmark's images (the old model of a
    compatibility experiment: RACT's split by class and split by data), or with ``split_seed`` a
    random such share drawn with that seed; the images of such a split are written to
    ``<run dir>/training_split.csv``; ``queries``: ``solution``
    (the Public and Private queries, enough for the metric) or ``all`` (every ``test.csv`` image,
    for a complete Kaggle file). ``image_size`` 224 and the crop area are RACT's."""

    benchmark = "gldv2"

    def __init__(
        self,
        root: str,
        train_file: Literal["train_clean.csv", "train.csv"] = "train_clean.csv",
        class_fraction: float = 1.0,
        image_fraction: float = 1.0,
        split_seed: Optional[int] = None,
        skip_missing: bool = False,
        queries: Literal["solution", "all"] = "solution",
        recognition: bool = False,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        batch_size: int = 64,
        num_workers: int = 8,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, skip_corrupt)
        self.save_hyperparameters()
        for name, fraction in (("class_fraction", class_fraction), ("image_fraction", image_fraction)):
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"data.{name} must be in (0, 1]; got {fraction}")
        if queries not in ("solution", "all"):
            raise ValueError(f"data.queries must be 'solution' or 'all'; got {queries!r}")
        self.train_file, self.class_fraction, self.skip_missing = train_file, class_fraction, skip_missing
        self.image_fraction = image_fraction
        self.queries, self.crop_scale, self.recognition = queries, tuple(crop_scale), recognition
        self.train_dataset: Optional[LandmarkTrainingImages] = None
        self.num_missing = 0

    @property
    def run_name(self) -> str:
        name = Path(self.train_file).stem
        if self.class_fraction < 1.0:
            name += f"_{self.class_fraction:g}"
        if self.image_fraction < 1.0:
            name += f"_images{self.image_fraction:g}"
        seeded = self.hparams.split_seed is not None and (self.class_fraction < 1.0 or self.image_fraction < 1.0)
        return f"{name}_seed{self.hparams.split_seed}" if seeded else name

    def _check_layout(self, files: Sequence[str]) -> None:
        missing = [f"{name}: {self.root / name}" for name in files if not (self.root / name).is_file()]
        if missing:
            raise layout_error("GLDv2", self.root, missing, "(cvdfoundation/google-landmark, v2.1: the CSV files beside "
                                                             "the train/, index/ and test/ image trees)")

    @cached_property
    def _training_list(self) -> list[tuple[str, int]]:
        self._check_layout([self.train_file])
        samples = read_training_list(self.root / self.train_file)
        rng = np.random.default_rng(self.hparams.split_seed) if self.hparams.split_seed is not None else None

        def first(items: list, fraction: float) -> list:
            """The first ``fraction`` of ``items``, or with ``split_seed`` a random such share."""
            items = list(items) if rng is None else [items[i] for i in rng.permutation(len(items))]
            return items[: max(1, round(fraction * len(items)))]

        if self.class_fraction < 1.0:
            kept = set(first(sorted({landmark for _, landmark in samples}), self.class_fraction))
            samples = [(i, landmark) for i, landmark in samples if landmark in kept]
        if self.image_fraction < 1.0:
            per_landmark: dict[int, list[str]] = {}
            for identifier, landmark in samples:
                per_landmark.setdefault(landmark, []).append(identifier)
            kept_images = {i for landmark in sorted(per_landmark) for i in first(per_landmark[landmark], self.image_fraction)}
            samples = [(i, landmark) for i, landmark in samples if i in kept_images]
        return samples

    @cached_property
    def landmark_ids(self) -> list[int]:
        """The training landmark ids in class order: class c is ``landmark_ids[c]``."""
        return sorted({landmark for _, landmark in self._training_list})

    @property
    def num_classes(self) -> int:
        """Classes of the training list; available before :meth:`setup` (linked into the model)."""
        return len(self.landmark_ids)

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints: the landmark id of each class."""
        return {"landmark_ids": self.landmark_ids}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("landmark_ids") != self.landmark_ids:
            raise ValueError(f"the checkpoint's classes are not this data's ({self.root / self.train_file}): its label "
                             "map has other landmark ids; resume with the training list it was trained on")

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root.resolve()), "train_file": self.train_file, "class_fraction": self.class_fraction, "image_fraction": self.image_fraction,
                "split_seed": self.hparams.split_seed,
                "num_classes": self.num_classes, "missing_training_images": self.num_missing,
                "queries": self.queries, "recognition": self.recognition, "split": "retrieval_solution_v2.1"}

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in ("fit", None):
            if self.train_dataset is None:
                self.train_dataset = self._training_images()
            run_dir = getattr(self.trainer, "default_root_dir", None) if self.trainer is not None else None
            if run_dir is not None and self.trainer.is_global_zero:
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                (Path(run_dir) / LABEL_MAP).write_text(json.dumps({str(l): c for c, l in enumerate(self.landmark_ids)}))
                if self.class_fraction < 1.0 or self.image_fraction < 1.0:
                    (Path(run_dir) / TRAINING_SPLIT).write_text(
                        "id,landmark_id\n" + "".join(f"{i},{landmark}\n" for i, landmark in self._training_list))
        self.eval_sets()

    def _training_images(self) -> LandmarkTrainingImages:
        class_of = {landmark: c for c, landmark in enumerate(self.landmark_ids)}
        samples, missing = [], []
        for identifier, landmark in self._training_list:
            path = hashed_path(self.root, "train", identifier)
            if path.is_file():
                samples.append((path, class_of[landmark]))
            else:
                missing.append(str(path))
        self.num_missing = len(missing)
        if missing and not self.skip_missing:
            listed = "\n".join(f"  {path}" for path in missing[:MISSING_LISTED])
            raise FileNotFoundError(f"{len(missing)} of the {len(self._training_list)} training images listed in "
                                    f"{self.root / self.train_file} are missing on disk, first:\n{listed}\n"
                                    "(GLDv2 downloads are often partial: complete it, or set data.skip_missing true "
                                    "to train without them)")
        if missing:
            log.warning("%d listed training images are missing on disk and left out (data.skip_missing)", len(missing))
        if not samples:
            raise FileNotFoundError(f"no training image of {self.root / self.train_file} is on disk under {self.root / 'train'}")
        return LandmarkTrainingImages(samples, self.image_size, self.crop_scale, self.skip_corrupt)

    @cached_property
    def solution(self) -> dict[str, dict[str, list]]:
        self._check_layout(["index.csv", "retrieval_solution_v2.1.csv"] + (["test.csv"] if self.queries == "all" else []))
        return read_solution(self.root / "retrieval_solution_v2.1.csv")

    @cached_property
    def recognition_solution(self) -> Optional[dict[str, dict[str, list]]]:
        """The recognition ground truth (``recognition: true``), else None."""
        if not self.recognition:
            return None
        self._check_layout(["recognition_solution_v2.1.csv"])
        return read_solution(self.root / "recognition_solution_v2.1.csv", "recognition")

    @cached_property
    def query_ids(self) -> list[str]:
        if self.queries == "all":
            return [row["id"] for _, row in csv_rows(self.root / "test.csv", ("id",))]
        ids = [*self.solution["public"], *self.solution["private"]]
        if self.recognition_solution is not None:
            listed = set(ids)
            ids += [i for split in SPLITS for i in self.recognition_solution[split] if i not in listed]
        return ids

    @cached_property
    def index_ids(self) -> list[str]:
        self.solution  # noqa: B018  checks the layout
        return [row["id"] for _, row in csv_rows(self.root / "index.csv", ("id",))]

    def eval_sets(self) -> dict[str, RetrievalImages]:
        if not self._eval_sets:
            paths = {"test": [hashed_path(self.root, "test", i) for i in self.query_ids],
                     "index": [hashed_path(self.root, "index", i) for i in self.index_ids]}
            missing = [str(path) for part in paths.values() for path in part if not path.is_file()]
            if missing:
                raise layout_error("GLDv2", self.root, missing, "(the test/ and index/ images of the retrieval split)")
            self._eval_sets = {name: RetrievalImages(p, self.image_size, self.skip_corrupt) for name, p in paths.items()}
        return self._eval_sets

    def retrieval_protocol(self) -> GLDv2Protocol:
        return GLDv2Protocol(self.query_ids, self.index_ids, self.solution)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, last partial batch dropped, resumable mid-epoch."""
        if self.train_dataset is None:
            self.setup("fit")
        return resumable_train_loader(self.train_dataset, self.trainer, drop_last=True,
                                      **loader_options(self.batch_size, self.num_workers))


class RevisitedDataModule(RetrievalDataModule):
    """ROxford5k / RParis6k (module docstring): the eval sets ``query`` (70 cropped queries) and
    ``database`` (4993 / 6322 images, + R1M with ``distractors``). Test only: it has no training
    classes (``num_classes`` None), so a checkpoint trained elsewhere is tested without its head."""

    benchmark = "revisited"
    num_classes = None
    tests_models_of_other_data = True

    def __init__(
        self,
        root: str,
        dataset: Literal["roxford5k", "rparis6k"] = "roxford5k",
        distractors: bool = False,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 8,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, skip_corrupt)
        self.save_hyperparameters()
        if dataset not in ("roxford5k", "rparis6k"):
            raise ValueError(f"data.dataset must be roxford5k or rparis6k; got {dataset!r}")
        self.dataset, self.distractors = dataset, distractors

    @property
    def run_name(self) -> str:
        return f"{self.dataset}+1m" if self.distractors else self.dataset

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root.resolve()), "dataset": self.dataset, "distractors": self.distractors,
                "database_size": len(self.eval_sets()["database"]), "split": "test"}

    @cached_property
    def ground_truth(self) -> dict[str, Any]:
        path = self.root / self.dataset / f"gnd_{self.dataset}.pkl"
        if not path.is_file():
            raise layout_error("revisited", self.root, [f"ground truth: {path}"], "(filipradenovic/revisitop)")
        with open(path, "rb") as f:
            try:
                ground_truth = pickle.load(f)
            except (pickle.UnpicklingError, EOFError) as error:
                raise ValueError(f"{path}: not a revisitop ground-truth pickle ({error})") from error
        keys = {"imlist", "qimlist", "gnd"}
        if not isinstance(ground_truth, dict) or not keys <= set(ground_truth):
            raise ValueError(f"{path}: expected a dict with {sorted(keys)}")
        for i, query in enumerate(ground_truth["gnd"]):
            if not {"bbx", "easy", "hard", "junk"} <= set(query):
                raise ValueError(f"{path}: gnd[{i}] needs bbx, easy, hard and junk; has {sorted(query)}")
        return ground_truth

    def eval_sets(self) -> dict[str, RetrievalImages]:
        if not self._eval_sets:
            images = self.root / self.dataset / "jpg"
            queries = [images / f"{name}.jpg" for name in self.ground_truth["qimlist"]]
            database = [images / f"{name}.jpg" for name in self.ground_truth["imlist"]]
            if self.distractors:
                listing = self.root / "revisitop1m" / "revisitop1m.txt"
                if not listing.is_file():
                    raise layout_error("revisited", self.root, [f"R1M list: {listing}"], "(or data.distractors false)")
                database += [self.root / "revisitop1m" / "jpg" / line.strip()
                             for line in listing.read_text().splitlines() if line.strip()]
            missing = [str(path) for path in [*queries, *database] if not path.is_file()]
            if missing:
                raise layout_error("revisited", self.root, missing)
            self._eval_sets = {
                "query": RetrievalImages(queries, self.image_size, self.skip_corrupt,
                                         boxes=[query["bbx"] for query in self.ground_truth["gnd"]]),
                "database": RetrievalImages(database, self.image_size, self.skip_corrupt),
            }
        return self._eval_sets

    def setup(self, stage: Optional[str] = None) -> None:
        self.eval_sets()

    def retrieval_protocol(self) -> RevisitedProtocol:
        return RevisitedProtocol(self.ground_truth["gnd"])
