"""MS1M face recognition training (MS1MV2 ``faces_emore``, MS1MV3 ``ms1m-retinaface-t1``) with the
insightface verification sets (LFW, CFP-FP, AgeDB-30, ...) for validation.

``<root>`` holds what insightface ships (benchmarks.md §3.1, §3.2): ``train.rec``, ``train.idx``,
``property`` (``num_classes,112,112``) and the verification pairs ``<name>.bin``. Instead of the
RecordIO, a user's own data can be an image folder ``<identity>/<image>.jpg|png``: every
non-hidden sub-folder is one identity, class ids follow plain ``sorted()`` of the folder names
(byte order: ``"B" < "a"``, ``"id10" < "id9"``), images are read in sorted order.

Images are 112x112 RGB (others are resized); the training transform is insightface
``arcface_torch``'s: RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5), i.e. (x/255 - 0.5)/0.5.
"""

import json
import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import EvalSet, VisionZooDataModule
from datamodules.corrupt import CorruptSamples
from datamodules.formats.images import decode_image, read_image
from datamodules.layout import layout_error
from datamodules.resumable import AugmentationRNG, eval_loader, loader_options, resumable_train_loader
from datamodules.formats.recordio import (
    RecordIOError,
    RecordIOReader,
    check_insightface_rec,
    identity_key_ranges,
    image_keys,
    image_labels,
    read_image_record,
    read_property,
)
from datamodules.formats.verification_bin import read_verification_bin

log = logging.getLogger(__name__)

SIZE = 112
DEFAULT_VAL_SETS = ("lfw", "cfp_fp", "agedb_30")
RECORDIO_FILES = ("train.rec", "train.idx", "property")
LABELS_CHECKED = ".ms1m_labels_checked.json"  # in the run directory: which .rec's labels were all checked
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def face_size(image: np.ndarray) -> np.ndarray:
    """``image`` resized to 112x112 (bilinear) unless it already is."""
    if image.shape[:2] == (SIZE, SIZE):
        return image
    return cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB to (3, H, W) float32 ``(x/255 - 0.5)/0.5`` (ToTensor, Normalize(0.5, 0.5))."""
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return tensor.float().div_(255).sub_(0.5).div_(0.5)


class FaceDataset(AugmentationRNG, Dataset):
    """Training faces as dicts ``image`` (3, 112, 112) float32 in [-1, 1], ``label`` and ``index``
    (the record key or folder position). Subclasses read one sample in :meth:`read`.

    With ``skip_corrupt`` an image that cannot be decoded is replaced by a random other sample,
    logged and counted in :attr:`num_skipped` (:mod:`datamodules.corrupt`). Random numbers
    (flips, replacements) come from :attr:`generator`, so that a resumed run draws the same ones
    (:mod:`datamodules.resumable`).
    """

    def __init__(self, horizontal_flip: bool, skip_corrupt: bool) -> None:
        self.horizontal_flip = horizontal_flip
        self.corrupt = CorruptSamples(skip_corrupt, "training image")

    @property
    def num_skipped(self) -> int:
        return self.corrupt.count

    def read(self, i: int) -> tuple[np.ndarray, int, int]:
        """Sample ``i`` as (112x112 RGB uint8 image, label, index); CorruptFileError names it."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label, index = self.corrupt.read_or_replace(self.read, i, len(self), self.generator)
        if self.horizontal_flip and torch.rand((), generator=self.generator) < 0.5:
            image = image[:, ::-1]
        return {"image": to_tensor(image), "label": label, "index": index}


class RecordIOFaceDataset(FaceDataset):
    """The image records ``keys`` of an insightface ``train.rec``; ``index`` is the record key.
    The reader opens the file lazily in each DataLoader worker."""

    def __init__(
        self, reader: RecordIOReader, keys: Sequence[int], horizontal_flip: bool, skip_corrupt: bool
    ) -> None:
        super().__init__(horizontal_flip, skip_corrupt)
        self.reader = reader
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> tuple[np.ndarray, int, int]:
        key = self.keys[i]
        label, payload = read_image_record(self.reader, key)
        return face_size(decode_image(payload, name=f"{self.reader.rec_path} key {key}")), label, key


class FolderFaceDataset(FaceDataset):
    """Image files with their class ids; ``index`` is the position in ``samples``."""

    def __init__(self, samples: Sequence[tuple[Path, int]], horizontal_flip: bool, skip_corrupt: bool) -> None:
        super().__init__(horizontal_flip, skip_corrupt)
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> tuple[np.ndarray, int, int]:
        path, label = self.samples[i]
        return face_size(read_image(path)), label, i


class IdentityPairDataset(AugmentationRNG, Dataset):
    """Semi-Siamese Training's sampling (Du et al., ECCV 2020): item ``c`` is identity ``c`` as
    two different images of it, ``image`` and ``image2`` (the same image twice when the identity
    has one), with ``label`` c. ``members[c]`` lists the identity's positions in ``images``."""

    def __init__(self, images: FaceDataset, members: Sequence[Sequence[int]]) -> None:
        empty = [c for c, m in enumerate(members) if len(m) == 0]
        if empty:
            raise ValueError(f"{len(empty)} identities have no image (first: class {empty[0]}); identity pairs need one")
        self.images = images
        self.members = members

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, c: int) -> dict[str, Any]:
        members = self.members[c]
        order = torch.randperm(len(members), generator=self.generator).tolist()
        first, second = order[0], order[1 % len(order)]
        return {"image": self.images[members[first]]["image"], "image2": self.images[members[second]]["image"], "label": c}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "images": self.images.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.images.load_state_dict(state["images"])


def embedding_input(image: np.ndarray, path: str) -> dict[str, Any]:
    """What a face is embedded from: ``image`` (3, 112, 112) float32 in [-1, 1], ``flipped`` (its
    horizontal flip, for insightface's flip-sum embedding) and ``path``."""
    tensor = to_tensor(face_size(image))
    return {"image": tensor, "flipped": tensor.flip(-1), "path": path}


class VerificationDataset(Dataset):
    """The 2P images of the verification ``.bin`` at ``path``, as :func:`embedding_input` (``path``:
    ``<bin>#<image>``) with ``pair_index`` (pair i owns images 2i and 2i+1) and ``issame``
    (whether pair ``pair_index`` shows one identity). Served as an :class:`~datamodules.base.EvalSet`
    named after the ``.bin``, which adds ``index``."""

    def __init__(self, images: np.ndarray, issame: np.ndarray, path: Path) -> None:
        if len(images) != 2 * len(issame):
            raise ValueError(f"{path}: a verification set of {len(issame)} pairs needs {2 * len(issame)} images, "
                             f"got {len(images)}")
        self.images = images
        self.issame = issame
        self.path = path

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**embedding_input(self.images[i], f"{self.path}#{i}"), "pair_index": i // 2, "issame": bool(self.issame[i // 2])}


class FaceImages(Dataset):
    """The face images ``paths`` as :func:`embedding_input`, for ``visionzoo predict``; a file
    that cannot be decoded is an error naming it."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return embedding_input(read_image(self.paths[i]), str(self.paths[i]))


class MS1MDataModule(VisionZooDataModule):
    """Train on MS1M (or an identity folder), validate on verification ``.bin`` sets.

    ``val_sets`` names ``<root>/<name>.bin`` files (``lfw``, ``cfp_fp``, ``agedb_30``, ``calfw``,
    ``cplfw``, ``cfp_ff``, ``vgg2_fp``, ...); by default those of lfw, cfp_fp and agedb_30 that
    exist. There is one val DataLoader per set, in the order of :attr:`val_set_names`.
    ``train_format="auto"`` reads the RecordIO when ``<root>/train.rec`` exists, else the image
    folder ``folder`` (default ``root``) when it has identity sub-folders.
    ``sampling="identity_pairs"`` makes an epoch one pass over the identities, each as two of
    its images (:class:`IdentityPairDataset`, for SST); ``batch_size`` then counts identities.
    ``batch_size_scope="global"`` makes ``batch_size`` the batch of one optimizer step over all
    ranks, divided over them (SST's authors trained one DataParallel batch of 128); by default it
    is each rank's.
    ``predict_root``: a folder of aligned faces (``.jpg``/``.jpeg``/``.png`` at any depth, resized
    to 112x112) that ``visionzoo predict`` embeds as the eval set ``predict``; without it, predict
    embeds the verification sets. ``root`` stays the training data's, which sizes the head.
    """

    benchmark = "ms1m"

    def __init__(
        self,
        root: str,
        val_sets: Optional[list[str]] = None,
        train_format: Literal["auto", "recordio", "folder"] = "auto",
        folder: Optional[str] = None,
        batch_size: int = 128,
        batch_size_scope: Literal["rank", "global"] = "rank",
        num_workers: int = 4,
        skip_corrupt: bool = False,
        horizontal_flip: bool = True,
        sampling: Literal["images", "identity_pairs"] = "images",
        predict_root: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.folder = Path(folder) if folder is not None else self.root
        if train_format == "auto":
            has_identities = not (self.root / "train.rec").exists() and bool(self._identities())
            train_format = "folder" if has_identities else "recordio"
        self.train_format: Literal["recordio", "folder"] = train_format
        if val_sets is None:
            val_sets = [name for name in DEFAULT_VAL_SETS if self._bin_path(name).is_file()]
        self.val_set_names: list[str] = list(val_sets)
        if batch_size_scope not in ("rank", "global"):
            raise ValueError(f"data.batch_size_scope must be 'rank' or 'global', got {batch_size_scope!r}")
        self.batch_size = batch_size
        self.batch_size_scope = batch_size_scope
        self.num_workers = num_workers
        self.skip_corrupt = skip_corrupt
        self.horizontal_flip = horizontal_flip
        self.sampling = sampling
        self.predict_root = Path(predict_root) if predict_root is not None else None
        self.train_dataset: Optional[FaceDataset] = None
        self.val_datasets: list[VerificationDataset] = []
        self._issame: dict[str, np.ndarray] = {}

    def _bin_path(self, name: str) -> Path:
        return self.root / f"{name}.bin"

    def _identities(self) -> list[str]:
        """Identity folder names, ``sorted()``; the class id is the position."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    @property
    def run_name(self) -> str:
        return "ms1m" if self.train_format == "recordio" else self.folder.resolve().name

    @cached_property
    def num_classes(self) -> int:
        """From ``property`` or the number of identity folders; available before :meth:`setup`."""
        self._check_layout()
        if self.train_format == "recordio":
            return read_property(self.root / "property")[0]
        return len(self._identities())

    @property
    def num_images(self) -> int:
        return len(self._train_dataset())

    @property
    def num_skipped(self) -> int:
        """Corrupt training images replaced so far (``skip_corrupt=True``)."""
        return self.train_dataset.num_skipped if self.train_dataset is not None else 0

    def issame(self, name: str) -> np.ndarray:
        """``issame`` [P] bool of verification set ``name`` (after :meth:`setup`)."""
        if name not in self._issame:
            raise KeyError(f"no verification set {name!r} was set up; have {list(self._issame)}")
        return self._issame[name]

    def describe(self) -> dict[str, Any]:
        """What the results writer records about the evaluated data."""
        return {
            "root": str(self.root.resolve()),
            "train_format": self.train_format,
            "num_classes": self.num_classes,
            "num_images": self.num_images,
            "val_sets": self.val_set_names,
            "split": "val",
        }

    def eval_set_names(self, stage: Literal["val", "test"]) -> list[str]:
        """The verification sets, for validation and test alike, in loader order."""
        return list(self.val_set_names)

    # ----------------------------------------------------------------------------- setup

    def setup(self, stage: Optional[str] = None) -> None:
        """Check the layout; read the training index (``fit``) and the verification sets."""
        self._check_layout()
        if stage in ("fit", None):
            self._train_dataset()
        if not self.val_datasets:
            for name in self.val_set_names:
                images, issame = read_verification_bin(self._bin_path(name))
                self.val_datasets.append(VerificationDataset(np.stack([face_size(image) for image in images]), issame,
                                                             self._bin_path(name)))
                self._issame[name] = issame

    def _check_layout(self) -> None:
        """Raise one FileNotFoundError listing every missing training file and requested ``.bin``."""
        missing = []
        if self.train_format == "recordio":
            files = [self.root / name for name in RECORDIO_FILES]
            missing += [f"{path.name}: {path}" for path in files if not path.is_file()]
        elif not self._identities():
            missing.append(f"identity folders: {self.folder}/<identity>/<image>.jpg|png")
        missing += [
            f"verification set {name}: {self._bin_path(name)}"
            for name in self.val_set_names
            if not self._bin_path(name).is_file()
        ]
        if missing:
            hint = ""
            if self.train_format == "recordio" and self.hparams.train_format == "auto":
                hint = "(for an image folder <identity>/<image>.jpg instead: train_format='folder', folder=...)"
            raise layout_error("MS1M", self.root, missing, hint)

    def _check_every_label(self, reader: RecordIOReader, keys: Sequence[int]) -> None:
        """Every image's class id in [0, num_classes): read from the record headers (no image is
        decoded; seconds for MS1M's 5.2 M records), once per ``.rec``/``.idx``/``property``
        version: the result is remembered in the run directory."""
        stamp = {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in
                           (reader.rec_path, reader.idx_path, self.root / "property")], "num_classes": self.num_classes}
        run_dir = getattr(self.trainer, "default_root_dir", None) if self.trainer is not None else None
        remembered = Path(run_dir) / LABELS_CHECKED if run_dir else None
        if remembered is not None and remembered.is_file() and json.loads(remembered.read_text()) == stamp:
            return
        labels = image_labels(reader, keys)
        outside = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if outside.size:
            examples = ", ".join(f"key {keys[i]}: {labels[i]}" for i in outside[:5])
            raise RecordIOError(f"{reader.rec_path}: {outside.size} image records have class ids outside [0, "
                                f"{self.num_classes}) (the class count of {self.root / 'property'}): {examples}")
        if remembered is not None:
            remembered.parent.mkdir(parents=True, exist_ok=True)
            remembered.write_text(json.dumps(stamp))

    def _train_dataset(self) -> FaceDataset:
        """The training dataset, built (and sanity-checked) on first use."""
        if self.train_dataset is not None:
            return self.train_dataset
        options = {"horizontal_flip": self.horizontal_flip, "skip_corrupt": self.skip_corrupt}
        if self.train_format == "recordio":
            reader = RecordIOReader(self.root / "train.rec", self.root / "train.idx")
            check_insightface_rec(reader, self.num_classes)
            self._check_every_label(reader, image_keys(reader))
            self.train_dataset = RecordIOFaceDataset(reader, image_keys(reader), **options)
        else:
            samples = [
                (path, label)
                for label, identity in enumerate(self._identities())
                for path in sorted((self.folder / identity).iterdir())
                if path.suffix.lower() in IMAGE_SUFFIXES
            ]
            if not samples:
                suffixes = "/".join(IMAGE_SUFFIXES)
                raise FileNotFoundError(f"no {suffixes} images in the identity folders of {self.folder}")
            self.train_dataset = FolderFaceDataset(samples, **options)
        return self.train_dataset

    # ------------------------------------------------------------------------ dataloaders

    def _identity_pairs(self) -> IdentityPairDataset:
        images = self._train_dataset()
        if isinstance(images, RecordIOFaceDataset):
            first = images.keys[0]
            members = [range(keys.start - first, keys.stop - first) for keys in identity_key_ranges(images.reader)]
        else:
            members = [[] for _ in range(self.num_classes)]
            for position, (_, label) in enumerate(images.samples):
                members[label].append(position)
        return IdentityPairDataset(images, members)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, last partial batch dropped, resumable mid-epoch."""
        dataset = self._identity_pairs() if self.sampling == "identity_pairs" else self._train_dataset()
        return resumable_train_loader(dataset, self.trainer, drop_last=True,
                                      **loader_options(self.rank_batch_size, self.num_workers))

    @property
    def rank_batch_size(self) -> int:
        """Each rank's training batch: ``batch_size``, or its share of it with ``batch_size_scope="global"``."""
        if self.batch_size_scope == "rank" or self.trainer is None:
            return self.batch_size
        world_size = self.trainer.world_size
        if self.batch_size % world_size:
            raise ValueError(f"data.batch_size={self.batch_size} is the global batch (data.batch_size_scope: global) "
                             f"and must divide over the {world_size} ranks")
        return self.batch_size // world_size

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per verification set, in the order of :attr:`val_set_names`."""
        return [eval_loader(EvalSet(name, dataset), **loader_options(self.batch_size, self.num_workers))
                for name, dataset in zip(self.val_set_names, self.val_datasets)]

    def test_dataloader(self) -> list[DataLoader]:
        """``visionzoo test`` reports the verification sets (the protocol has no other test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        """The faces of ``predict_root`` (eval set ``predict``), else the verification sets."""
        if self.predict_root is None:
            return self.val_dataloader()
        paths = sorted(p for p in self.predict_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise FileNotFoundError(f"data.predict_root {self.predict_root}: no {'/'.join(IMAGE_SUFFIXES)} images "
                                    "(expected aligned faces, in sub-folders or not)")
        return [eval_loader(EvalSet("predict", FaceImages(paths)), **loader_options(self.batch_size, self.num_workers))]
