"""Zero-shot (unsupervised) video object segmentation data: DAVIS 2016 frames with their optical
flow and the primary object's binary mask (method cards 3-5).

:class:`ZeroShotDAVISDataModule` is :class:`~datamodules.davis.DAVISDataModule` in the zero-shot
protocol: DAVIS 2016 (the 2017 masks merged into one object, or the 2016 package's binary
masks), the unsupervised task (no mask given at test time, every annotated frame scored), and a
``flow_root`` read for every frame (required). Training items (``training_items``):

- ``frames`` (HFAN, :class:`FlowFrames`): single frames of ``train_split`` with their flow image
  and binary mask (void 255 kept, out of the loss), augmented together as HFAN's mmseg
  pipeline: a random rescale by 0.5-2.0 of ``crop_size``, a random crop of ``crop_size``, a
  horizontal flip, and the same photometric distortion (brightness, contrast, saturation, hue)
  applied to the frame and the flow image. Items: ``image`` and ``flow`` [3, S, S] normalised,
  ``mask`` [S, S] int64.
- ``pairs`` (HCPN, HGPU, :class:`FlowFramePairs`): consecutive frames t, t+1 with the flow of t,
  both masks and both hard-negative maps (:func:`hard_negatives`), resized to ``crop_size``
  squared, then (as the authors' ``ScaleNRotate`` and flip) scaled by 0.75-1.25 and rotated by
  ±10° about the centre and flipped, all alike. Items: ``image``, ``image2``, ``flow``;
  ``mask``, ``mask2`` int64; ``hard_negatives``, ``hard_negatives2`` float [S, S].

The hard-negative maps need edge maps: HED's, as the authors precompute them, under
``edge_root`` (``<edge_root>/<seq>/<frame>.jpg|png``, white edges), or without ``edge_root`` the
Sobel gradient magnitude of the frame scaled to 0-255 (a stand-in: no HED network here).

Other training data (image saliency sets, YouTube-VOS binarised) in a plain folder,
``extra_train_root``: ``images/<name>.jpg``, ``flows/<name>.png`` and ``masks/<name>.png``
(grayscale or index masks; every object is foreground); for ``pairs``, the same three folders
hold a folder per video (``images/<video>/<frame>.jpg`` ...), whose consecutive frames pair up
(and ``edges/<video>/<frame>.jpg|png`` where there are HED maps).
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


def hard_negatives(mask: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """HCPN's and HGPU's hard-negative map (their ``dataloader.py``): n = dilate₅ₓ₅((1 − edges/255)
    · (1 − dilate₁₁ₓ₁₁(mask))), float32 in [0, 1], zero on and near the object; the loss weighs a
    pixel 1 + n. ``mask``: 0/1 (void 255 counts as object, as the authors' ``mask > 0``),
    ``edges``: uint8 edge strengths."""
    near_object = cv2.dilate((mask > 0).astype(np.uint8), np.ones((11, 11), np.uint8))
    negatives = (1.0 - edges.astype(np.float32) / 255.0) * (1 - near_object).astype(np.float32)
    return cv2.dilate(negatives, np.ones((5, 5), np.uint8))


def sobel_edges(frame: np.ndarray) -> np.ndarray:
    """The stand-in for HED (module docstring): Sobel gradient magnitude of the grey frame, uint8
    scaled so that the strongest edge is 255."""
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    magnitude = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    return (255.0 * magnitude / max(float(magnitude.max()), 1e-6)).astype(np.uint8)


def edge_path(folder: Path, frame: Path) -> Path:
    """``<folder>/<frame stem>.jpg`` or ``.png``; an error naming both when neither exists."""
    for suffix in (".jpg", ".png"):
        if (folder / f"{frame.stem}{suffix}").is_file():
            return folder / f"{frame.stem}{suffix}"
    raise FileNotFoundError(f"{folder / frame.stem}.jpg (or .png): the edge map of {frame} is missing (HED edges, "
                            "white on black; leave data.edge_root out to use Sobel edges)")


def read_grey(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path}: not a readable image (expected an edge map, 8-bit grey)")
    return image


PairSample = tuple[Path, Path, Path, Path, Path, Optional[Path], Optional[Path]]


class FlowFramePairs(AugmentationRNG, Dataset):
    """Training pairs of consecutive frames (module docstring); ``samples`` are (frame t, frame
    t+1, flow image of t, annotation t, annotation t+1, edge map t, edge map t+1 or None)."""

    def __init__(self, samples: Sequence[PairSample], size: int) -> None:
        self.samples, self.size = list(samples), size
        self.transform = A.Compose([
            A.Resize(size, size),
            A.Affine(scale=(0.75, 1.25), rotate=(-10, 10), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0),
            A.HorizontalFlip(),
        ], additional_targets={"image2": "image", "flow": "image", "mask2": "mask", "hard": "mask", "hard2": "mask"})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        frame1, frame2, flow, annotation1, annotation2, edges1, edges2 = self.samples[index]
        images = [read_image(frame1), read_image(frame2)]
        masks = [binary_mask(read_annotation(annotation1)), binary_mask(read_annotation(annotation2))]
        edges = [sobel_edges(image) if path is None else read_grey(path) for image, path in zip(images, (edges1, edges2))]
        hard = [hard_negatives(mask, edge) for mask, edge in zip(masks, edges)]
        self.transform.set_random_seed(self.draw_seed())
        out = self.transform(image=images[0], image2=images[1], flow=read_image(flow), mask=masks[0], mask2=masks[1],
                             hard=hard[0], hard2=hard[1])
        item = {name: frame_tensor(out[name]) for name in ("image", "image2", "flow")}
        item |= {name: torch.from_numpy(out[name].astype(np.int64)) for name in ("mask", "mask2")}
        item |= {key: torch.from_numpy(out[name].astype(np.float32)) for key, name in
                 (("hard_negatives", "hard"), ("hard_negatives2", "hard2"))}
        return item


def sequence_pairs(records: Sequence[SequenceRecord], flow: FlowFolder, edge_root: Optional[Path]) -> list[PairSample]:
    """Consecutive pairs of every sequence (the authors' ``print_list_davis``)."""
    pairs = []
    for record in records:
        for t in range(len(record.frames) - 1):
            frames = record.frames[t:t + 2]
            edges = [None, None] if edge_root is None else [edge_path(edge_root / record.name, f) for f in frames]
            pairs.append((*frames, flow.path(record, t), *record.annotations[t:t + 2], *edges))
    return pairs


def folder_pairs(root: Path) -> list[PairSample]:
    """Consecutive pairs of the videos of a plain folder (module docstring)."""
    folders = [root / name for name in ("images", "flows", "masks")]
    missing = [str(path) for path in folders if not path.is_dir()]
    if missing:
        raise layout_error("video frame+flow+mask folder", root, missing,
                           "(expected images/<video>/<frame>.jpg, flows/<video>/<frame>.png, masks/<video>/<frame>.png)")
    pairs = []
    for video in sorted(p for p in folders[0].iterdir() if p.is_dir()):
        frames = sorted(p for p in video.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        edge_folder = root / "edges" / video.name
        for frame1, frame2 in zip(frames, frames[1:]):
            flow, mask1, mask2 = (folders[1] / video.name / f"{frame1.stem}.png", folders[2] / video.name / f"{frame1.stem}.png",
                                  folders[2] / video.name / f"{frame2.stem}.png")
            for path in (flow, mask1, mask2):
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: missing for the pair {frame1.name}, {frame2.name} of {video}")
            edges = [edge_path(edge_folder, f) for f in (frame1, frame2)] if edge_folder.is_dir() else [None, None]
            pairs.append((frame1, frame2, flow, mask1, mask2, *edges))
    if not pairs:
        raise layout_error("video frame+flow+mask folder", root, [str(folders[0] / "<video>")],
                           "(no video folder with two frames or more)")
    return pairs


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
    the unsupervised task by default; ``training_items`` single ``frames`` in ``crop_size``
    (512) crops (HFAN) or consecutive ``pairs`` resized to ``crop_size`` squared (HCPN, HGPU),
    with ``edge_root`` for their hard-negative maps."""

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
        training_items: Literal["frames", "pairs"] = "frames",
        edge_root: Optional[str] = None,
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
            extra = Path(self.hparams.extra_train_root) if self.hparams.extra_train_root else None
            if self.hparams.training_items == "pairs":
                edges = Path(self.hparams.edge_root) if self.hparams.edge_root else None
                parts = [FlowFramePairs(sequence_pairs(records, self.flow, edges), self.hparams.crop_size)]
                parts += [FlowFramePairs(folder_pairs(extra), self.hparams.crop_size)] if extra else []
            else:
                parts = [FlowFrames(sequence_samples(records, self.flow), self.hparams.crop_size)]
                parts += [FlowFrames(folder_samples(extra), self.hparams.crop_size)] if extra else []
            self.train_frames = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        validates = stage != "fit" or self.trainer is None or self.trainer.limit_val_batches != 0
        if validates:
            super().setup("test")

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return resumable_train_loader(self.train_frames, self.trainer, drop_last=True,
                                      **loader_options(self.batch_size, self.num_workers))
