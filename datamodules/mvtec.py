"""MVTec AD (Bergmann et al., CVPR 2019) in its official folder layout.

``<root>/<category>/train/good/*.png`` are the normal training images;
``<root>/<category>/test/<defect>/*.png`` the test images, each non-good one with its
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png`` (0/255). See benchmarks.md §5.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.base import EvalSet, VisionZooDataModule
from datamodules.corrupt import CorruptSamples
from datamodules.formats.images import CorruptFileError, read_image, read_mask, read_size
from datamodules.layout import layout_error
from datamodules.resumable import AugmentationRNG, eval_loader, loader_options, resumable_train_loader


@dataclass(frozen=True)
class Sample:
    """One image of a category; ``mask`` is None for good images (their mask is all zeros)."""

    image: Path
    defect_type: str
    mask: Optional[Path] = None

    @property
    def label(self) -> int:
        return int(self.defect_type != "good")


class MVTecDataset(AugmentationRNG, Dataset):
    """Samples as dicts: ``image`` (3, S, S) float32, ``mask`` bool, ``label``, ``defect_type``, ``path``.

    With ``resize_mask`` the mask goes through ``transform`` together with the image
    (albumentations resizes masks nearest); otherwise it keeps the file's resolution.
    The transform is reseeded per sample from :attr:`generator`, so that augmentations are
    reproducible and a resumed run draws the same ones (:mod:`datamodules.resumable`).
    """

    def __init__(self, samples: list[Sample], transform: A.Compose, resize_mask: bool) -> None:
        self.samples = samples
        self.transform = transform
        self.resize_mask = resize_mask

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = read_mask(sample.mask) if sample.mask else np.zeros(image.shape[:2], bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} px but its image "
                f"{sample.image} is {image.shape[1]}x{image.shape[0]} px; they must match"
            )
        self.transform.set_random_seed(self.draw_seed())
        if self.resize_mask:
            out = self.transform(image=image, mask=mask.astype(np.uint8))
            mask_tensor = out["mask"].bool()
        else:
            out = self.transform(image=image)
            mask_tensor = torch.from_numpy(mask)
        return {
            "image": out["image"],
            "mask": mask_tensor,
            "label": sample.label,
            "defect_type": sample.defect_type,
            "path": str(sample.image),
        }


def scan_category(root: Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """The train and test samples of one category, checking the whole official layout at once
    (an error lists every missing folder, image and mask)."""
    folder = root / category
    if not folder.is_dir():
        if root.is_dir():
            present = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir()))
            hint = f"categories present under {root}: {present or '(none)'}"
        else:
            hint = f"the root folder {root} does not exist"
        raise layout_error("MVTec AD", root, [f"category folder: {folder}"], hint)
    missing = []
    train = [Sample(path, "good") for path in sorted((folder / "train" / "good").glob("*.png"))]
    if not train:
        missing.append(f"training images: {folder / 'train' / 'good' / '*.png'}")
    test_folders = sorted(p for p in (folder / "test").glob("*") if p.is_dir())
    test = []
    for defect_folder in test_folders:
        defect = defect_folder.name
        for path in sorted(defect_folder.glob("*.png")):
            if defect == "good":
                test.append(Sample(path, defect))
                continue
            mask = folder / "ground_truth" / defect / f"{path.stem}_mask.png"
            if not mask.is_file():
                missing.append(f"mask of test/{defect}/{path.name}: {mask}")
            test.append(Sample(path, defect, mask))
    if not test:
        missing.append(f"test images: {folder / 'test' / '<defect>' / '*.png'}")
    if missing:
        raise layout_error("MVTec AD", root, missing)
    return train, test


class PILResize(A.DualTransform):
    """Resize to ``size``² with PIL, as MSFlow's torchvision ``T.Resize(LANCZOS)`` on PIL images:
    images by Lanczos, whose kernel widens when downscaling (antialiased; OpenCV's
    ``INTER_LANCZOS4`` keeps an 8×8 kernel and aliases), masks by PIL's nearest (their
    ``T.Resize(NEAREST)``)."""

    def __init__(self, size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size = size

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.Resampling.LANCZOS))

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return np.asarray(Image.fromarray(mask).resize((self.size, self.size), Image.Resampling.NEAREST))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


class MVTecDataModule(VisionZooDataModule):
    """One MVTec AD category: train on ``train/good``, test on ``test/*`` with masks.

    ``mask_resolution="original"`` keeps test masks at ground-truth resolution (the official
    protocol); ``"input"`` resizes them with the image to ``image_size`` (nearest).
    """

    benchmark = "mvtec"

    def __init__(
        self,
        root: str,
        category: str = "bottle",
        image_size: int = 512,
        batch_size: int = 8,
        num_workers: int = 4,
        val_fraction: float = 0.0,
        mask_resolution: Literal["original", "input"] = "original",
        train_augmentations: Optional[list[A.BasicTransform]] = None,
        skip_corrupt: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.category = category
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.mask_resolution = mask_resolution
        self.train_augmentations = train_augmentations or []
        self.skip_corrupt = skip_corrupt
        self.seed = seed
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.corrupt = CorruptSamples(skip_corrupt, "MVTec sample")

    @property
    def run_name(self) -> str:
        return self.category

    @property
    def num_skipped(self) -> int:
        """Corrupt samples dropped by ``setup`` (``skip_corrupt=True``), over all splits set up."""
        return self.corrupt.count

    def describe(self) -> dict[str, Any]:
        """What the results writer records about the evaluated data."""
        return {
            "root": str(self.root.resolve()),
            "category": self.category,
            "image_size": self.image_size,
            "mask_resolution": self.mask_resolution,
            "split": "test",
        }

    def eval_set_names(self, stage: Literal["val", "test"]) -> list[str]:
        """``val``: the held-out good training images (when ``val_fraction`` > 0); ``test``: the test split."""
        if stage == "val":
            return ["val"] if self.val_fraction else []
        return ["test"]

    # ----------------------------------------------------------------------------- setup

    def setup(self, stage: Optional[str] = None) -> None:
        train, test = self._scan()
        if stage in ("fit", "validate", None):
            train, val = self._split_val(train)
            self.train_samples = self._usable("train", train)
            self.val_samples = self._usable("val", val)
        if stage in ("test", "predict", None):
            self.test_samples = self._usable("test", test)

    def _scan(self) -> tuple[list[Sample], list[Sample]]:
        return scan_category(self.root, self.category)

    def _split_val(self, train: list[Sample]) -> tuple[list[Sample], list[Sample]]:
        """Hold out ``val_fraction`` of the good training images, chosen by ``seed``."""
        n_val = 0
        if self.val_fraction:  # hold out at least one image and keep at least one
            n_val = min(max(round(self.val_fraction * len(train)), 1), len(train) - 1)
        held_out = set(np.random.default_rng(self.seed).permutation(len(train))[:n_val].tolist())
        return (
            [s for i, s in enumerate(train) if i not in held_out],
            [s for i, s in enumerate(train) if i in held_out],
        )

    def _usable(self, split: str, samples: list[Sample]) -> list[Sample]:
        """Drop corrupt samples if asked, and check that masks at original size can be batched."""
        if self.skip_corrupt:
            with ThreadPoolExecutor(max_workers=4) as pool:
                decoded = list(pool.map(self._decoded_size, samples))
            for sample, result in zip(samples, decoded):
                if isinstance(result, CorruptFileError):
                    self.corrupt.skip(result, f"left out of the {split} split of {self.category}")
                    self.skipped_files.append(str(sample.image))
            sizes = [None if isinstance(result, CorruptFileError) else result for result in decoded]
            kept = [s for s, size in zip(samples, sizes) if size is not None]
        else:
            # Header sizes only; a corrupt file raises CorruptFileError when it is loaded.
            sizes = [self._header_size(s) for s in samples]
            kept = samples
        if self.mask_resolution == "original":
            self._check_one_size([(s, size) for s, size in zip(samples, sizes) if size is not None])
        return kept

    @staticmethod
    def _decoded_size(sample: Sample) -> tuple[int, int] | CorruptFileError:
        """Decode image and mask; their (height, width), or the error if one is corrupt."""
        try:
            shape = read_image(sample.image).shape[:2]
            if sample.mask:
                read_mask(sample.mask)
        except CorruptFileError as error:
            return error
        return shape

    @staticmethod
    def _header_size(sample: Sample) -> Optional[tuple[int, int]]:
        try:
            return read_size(sample.image)
        except CorruptFileError:
            return None

    def _check_one_size(self, samples: list[tuple[Sample, tuple[int, int]]]) -> None:
        """Masks at original resolution are collated as they are, so all sizes must agree."""
        if not samples:
            return
        first, first_size = samples[0]
        for sample, size in samples[1:]:
            if size != first_size:
                raise ValueError(
                    f"images of MVTec category {self.category!r} differ in size: {first.image} is "
                    f"{first_size[1]}x{first_size[0]} px, {sample.image} is {size[1]}x{size[0]} px; "
                    "with mask_resolution='original' masks keep their file size and cannot be "
                    "batched together: use mask_resolution='input' or batch_size=1"
                )

    # ------------------------------------------------------------------------ dataloaders

    def _transform(self, augmentations: list[A.BasicTransform]) -> A.Compose:
        """Augmentations, then PIL's LANCZOS resize (as MSFlow), ImageNet normalisation, tensor."""
        return A.Compose([
            *augmentations,
            PILResize(self.image_size),
            A.Normalize(),
            ToTensorV2(),
        ])

    def _dataset(self, samples: list[Sample], augmentations: list[A.BasicTransform]) -> MVTecDataset:
        return MVTecDataset(samples, self._transform(augmentations), self.mask_resolution == "input")

    def train_dataloader(self) -> DataLoader:
        """Shuffled, with ``train_augmentations``, resumable mid-epoch."""
        dataset = self._dataset(self.train_samples, self.train_augmentations)
        return resumable_train_loader(dataset, self.trainer, drop_last=False, **loader_options(self.batch_size, self.num_workers))

    def val_dataloader(self) -> DataLoader | list:
        """Held-out good training images; none (validation skipped) when ``val_fraction`` is 0."""
        if not self.val_samples:
            return []
        return eval_loader(EvalSet("val", self._dataset(self.val_samples, [])), **loader_options(self.batch_size, self.num_workers))

    def test_dataloader(self) -> DataLoader:
        """The test split as the eval set ``test``; items carry ``eval_set`` and ``index``."""
        return eval_loader(EvalSet("test", self._dataset(self.test_samples, [])), **loader_options(self.batch_size, self.num_workers))

    def predict_dataloader(self) -> DataLoader:
        """``visionzoo predict`` maps the test split (eval set ``test``)."""
        return self.test_dataloader()
