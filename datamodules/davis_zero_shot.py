"""Zero-shot (unsupervised) video object segmentation data: DAVIS 2016 frames with their optical
flow and the primary object's binary mask (method cards 3-5).

:class:`ZeroShotDAVISDataModule` is :class:`~datamodules.davis.DAVISDataModule` in the zero-shot
protocol: DAVIS 2016 (the 2017 masks merged into one object, or the 2016 package's binary
masks), the unsupervised task (no mask given at test time, every annotated frame scored), and a
``flow_root`` read for every frame (required). Training items (:class:`FlowFrames`) are single
frames of ``train_split`` with their flow image and binary mask (void 255 kept, out of the
loss), augmented together as HFAN's mmseg pipeline: a random rescale by 0.5-2.0 of
``crop_size``, a random crop of ``crop_size``, a horizontal flip, and the same photometric
distortion (brightness, contrast, saturation, hue) applied to the frame and the flow image.
Items: ``image`` and ``flow`` [3, S, S] normalised, ``mask`` [S, S] int64.

Other training data (image saliency sets, YouTube-VOS binarised) in a plain folder,
``extra_train_root``: ``images/<name>.jpg``, ``flows/<name>.png`` and ``masks/<name>.png``
(grayscale or index masks; every object is foreground).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from benchmarks.metrics.davis import Task, read_annotation
from datamodules.davis import DAVISDataModule, FlowFolder
from datamodules.formats.images import read_image
from datamodules.layout import layout_error
from datamodules.resumable import AugmentationRNG, loader_options, resumable_train_loader
from datamodules.vos_clips import SequenceRecord, frame_tensor

VOID = 255


def binary_mask(labels: np.ndarray) -> np.ndarray:
    """Every object is the foreground (1); void stays 255."""
    return np.where(labels == VOID, VOID, (labels > 0).astype(np.uint8)).astype(np.uint8)


class FlowFrames(AugmentationRNG, Dataset):
    """Training frames with flow and binary mask (module docstring); ``samples`` are (frame,
    flow image, annotation) paths."""

    def __init__(self, samples: Sequence[tuple[Path, Path, Path]], crop_size: int) -> None:
        self.samples, self.crop_size = list(samples), crop_size
        self.transform = A.Compose([
            A.RandomScale(scale_limit=(-0.5, 1.0), p=1.0),  # x0.5 .. x2
            A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=VOID),
            A.RandomCrop(crop_size, crop_size),
            A.HorizontalFlip(),
            A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5),
        ], additional_targets={"flow": "image"})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        frame, flow, annotation = self.samples[index]
        self.transform.set_random_seed(self.draw_seed())
        out = self.transform(image=read_image(frame), flow=read_image(flow), mask=binary_mask(read_annotation(annotation)))
        return {"image": frame_tensor(out["image"]), "flow": frame_tensor(out["flow"]),
                "mask": torch.from_numpy(out["mask"].astype(np.int64))}


def sequence_samples(records: Sequence[SequenceRecord], flow: FlowFolder) -> list[tuple[Path, Path, Path]]:
    return [(record.frames[t], flow.path(record, t), record.annotations[t]) for record in records
            for t in range(len(record.frames))]


def folder_samples(root: Path) -> list[tuple[Path, Path, Path]]:
    """``images/``, ``flows/`` and ``masks/`` of a plain folder (module docstring)."""
    folders = [root / name for name in ("images", "flows", "masks")]
    missing = [str(path) for path in folders if not path.is_dir()]
    if missing:
        raise layout_error("frame+flow+mask folder", root, missing, "(expected images/<name>.jpg, flows/<name>.png, masks/<name>.png)")
    samples = []
    for image in sorted(p for p in folders[0].iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        flow, mask = folders[1] / f"{image.stem}.png", folders[2] / f"{image.stem}.png"
        for path in (flow, mask):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing for {image}")
        samples.append((image, flow, mask))
    return samples


class ZeroShotDAVISDataModule(DAVISDataModule):
    """DAVIS in the zero-shot protocol (module docstring): ``flow_root`` required, DAVIS 2016 and
    the unsupervised task by default, ``crop_size`` (512) training crops of single frames."""

    def __init__(
        self,
        root: str,
        flow_root: str,
        flow_format: Literal["png", "flo"] = "png",
        year: Literal[2016, 2017] = 2016,
        split: str = "val",
        resolution: str = "480p",
        task: Task = "unsupervised",
        train_split: str = "train",
        crop_size: int = 512,
        extra_train_root: Optional[str] = None,
        batch_size: int = 8,
        num_workers: int = 2,
    ) -> None:
        super().__init__(root, year=year, split=split, resolution=resolution, task=task, train_split=train_split,
                         crop_size=crop_size, batch_size=batch_size, flow_root=flow_root, flow_format=flow_format,
                         num_workers=num_workers)
        self.save_hyperparameters()
        if flow_format != "png":
            raise ValueError("data.flow_format: the zero-shot methods train on flow images; render .flo files to PNGs "
                             "(python -m datamodules.prepare davis_flow writes both)")
        self.train_frames: Optional[Dataset] = None

    @property
    def run_name(self) -> str:
        return f"{self.year}_{self.split}_zero_shot"

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in ("fit", None) and self.train_frames is None:
            records = self._records(self.train_split, "Annotations")
            self.flow.check(records)
            parts = [FlowFrames(sequence_samples(records, self.flow), self.hparams.crop_size)]
            if self.hparams.extra_train_root:
                parts.append(FlowFrames(folder_samples(Path(self.hparams.extra_train_root)), self.hparams.crop_size))
            self.train_frames = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        validates = stage != "fit" or self.trainer is None or self.trainer.limit_val_batches != 0
        if validates:
            super().setup("test")

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return resumable_train_loader(self.train_frames, self.trainer, drop_last=True,
                                      **loader_options(self.batch_size, self.num_workers))
