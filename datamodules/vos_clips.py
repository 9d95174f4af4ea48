"""Training clips for semi-supervised video object segmentation (STM, LCM), from three kinds of
data, mixed in one epoch (:class:`VOSClips`):

- **DAVIS** sequences (``datamodules.davis`` scans them);
- **YouTube-VOS** in its own layout (:func:`scan_youtube_vos`): ``<root>/<split>/JPEGImages/<video>/<frame>.jpg``
  and ``<root>/<split>/Annotations/<video>/<frame>.png`` (palette PNGs, 1..N objects), annotated
  every 5th frame (frame names 00000, 00005, ...); the temporal skip, counted in DAVIS frames, is
  divided by that step, as STM's third-party training code divides it by 5;
- **static images** with object masks (:func:`scan_image_masks`), STM's stage 1:
  ``<root>/images/<name>.{jpg,png}`` and ``<root>/masks/<name>.png`` (an index PNG, 0 background,
  1..N objects, 255 void, or a grayscale mask whose ≥ 128 is one object: saliency sets such as
  MSRA10K and ECSSD; COCO's polygons converted to index PNGs). A clip of an image is the image and
  ``num_frames - 1`` successive random perspective deformations of it, each of the previous
  frame, moving the corners by up to ``static_deformation`` of the image size (haochenheheda/
  Training-Code-of-STM ``dataset/coco.py``: two homographies, corners moved by up to a tenth).

Every clip then gets one joint augmentation of all its frames and masks (albumentations: affine,
pad and random crop, flip).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from benchmarks.metrics.davis import read_annotation
from datamodules.clips import as_clip, to_model_input
from datamodules.formats.images import read_image
from datamodules.layout import layout_error
from datamodules.resumable import AugmentationRNG, split_epoch_index

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class SequenceRecord:
    """A sequence on disk: its frame and annotation files, in frame order (a static image is a
    one-frame record)."""

    name: str
    frames: tuple[Path, ...]
    annotations: tuple[Path, ...]

    @property
    def frame_names(self) -> list[str]:
        return [path.stem for path in self.frames]


@dataclass(frozen=True)
class ClipSource:
    """One dataset's share of an epoch: ``clips_per_sequence`` clips of each of its ``records``;
    ``frame_step``: the frame-number step between annotated frames, which divides the temporal
    skip (YouTube-VOS: 5); ``static``: records are single images deformed into clips."""

    name: str
    records: tuple[SequenceRecord, ...]
    clips_per_sequence: int = 1
    frame_step: int = 1
    static: bool = False

    def __len__(self) -> int:
        return len(self.records) * self.clips_per_sequence


def frame_tensor(frame: np.ndarray) -> Tensor:
    """An RGB uint8 frame [H, W, 3] as the ImageNet-normalised float tensor [3, H, W]."""
    return to_model_input(as_clip(frame[None]))[:, 0]


def clip_frames(length: int, num_frames: int, skip: int, generator: torch.Generator) -> list[int]:
    """Increasing frame indices of a training clip (STM's training code): the first anywhere
    before the last ``num_frames - 1`` frames, each next one 1 to ``skip + 1`` frames after the
    previous, as far as the sequence allows."""
    if length < num_frames:
        raise ValueError(f"a training clip of {num_frames} frames needs a sequence of as many; got {length}")
    first = int(torch.randint(length - num_frames + 1, (), generator=generator))
    frames = [first]
    for remaining in range(num_frames - 1, 0, -1):
        low = frames[-1] + 1
        high = min(length - remaining, frames[-1] + 1 + skip)  # room for the frames still to come
        frames.append(low + int(torch.randint(high - low + 1, (), generator=generator)))
    return frames


def scan_youtube_vos(root: Path, split: str = "train") -> tuple[SequenceRecord, ...]:
    """The annotated frames of every video of YouTube-VOS ``split`` (module docstring); a
    missing folder is listed, an annotation without its frame an error naming both."""
    frame_root, annotation_root = root / split / "JPEGImages", root / split / "Annotations"
    missing = [str(path) for path in (frame_root, annotation_root) if not path.is_dir()]
    if missing:
        raise layout_error("YouTube-VOS", root, missing, f"(expected {split}/JPEGImages/<video>/ and {split}/Annotations/<video>/)")
    records = []
    for video in sorted(path for path in annotation_root.iterdir() if path.is_dir()):
        annotations = tuple(sorted(video.glob("*.png")))
        frames = tuple(frame_root / video.name / f"{path.stem}.jpg" for path in annotations)
        for frame, annotation in zip(frames, annotations):
            if not frame.is_file():
                raise FileNotFoundError(f"{frame}: the frame of annotation {annotation} is missing")
        if annotations:
            records.append(SequenceRecord(video.name, frames, annotations))
    if not records:
        raise FileNotFoundError(f"{annotation_root}: no annotated videos")
    return tuple(records)


def frame_step(records: Sequence[SequenceRecord]) -> int:
    """The most common step between consecutive annotated frame numbers (YouTube-VOS: 5)."""
    steps = Counter(int(b.stem) - int(a.stem) for record in records for a, b in zip(record.frames, record.frames[1:])
                    if a.stem.isdigit() and b.stem.isdigit())
    return steps.most_common(1)[0][0] if steps else 1


def scan_image_masks(root: Path) -> tuple[SequenceRecord, ...]:
    """``images/<name>`` with ``masks/<name>.png`` (module docstring) as one-frame records; an image
    without its mask is an error naming the mask."""
    image_root, mask_root = root / "images", root / "masks"
    missing = [str(path) for path in (image_root, mask_root) if not path.is_dir()]
    if missing:
        raise layout_error("image+mask folder", root, missing, "(expected images/<name>.jpg and masks/<name>.png)")
    records = []
    for image in sorted(path for path in image_root.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES):
        mask = mask_root / f"{image.stem}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"{mask}: the mask of {image} is missing")
        records.append(SequenceRecord(image.stem, (image,), (mask,)))
    if not records:
        raise FileNotFoundError(f"{image_root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return tuple(records)


class VOSClips(AugmentationRNG, Dataset):
    """Training clips of ``num_frames`` frames from the ``sources`` (module docstring): of a
    sequence by :func:`clip_frames` with the skip ``min(max_skip, epoch // skip_every_epochs) //
    frame_step`` (the epoch carried by the index), of a static image by successive deformations;
    one joint augmentation of all frames and masks (affine, pad and random crop to ``crop_size``,
    flip); the objects of the first frame relabelled 1..n (at most ``max_objects``, the others
    background), void 255 kept. Items: ``frames`` [F, 3, S, S] normalised, ``masks`` [F, S, S]
    int64, ``num_objects``. A crop without an object in its first frame is drawn again (up to 20
    times)."""

    def __init__(self, sources: Sequence[ClipSource], num_frames: int, crop_size: int, max_skip: int,
                 skip_every_epochs: int, max_objects: int, static_deformation: float = 0.1) -> None:
        self.sources = [source for source in sources if len(source)]
        if not self.sources:
            raise ValueError("no training clips: every source is empty")
        self.num_frames, self.crop_size, self.max_skip = num_frames, crop_size, max_skip
        self.skip_every_epochs, self.max_objects = skip_every_epochs, max_objects
        self.offsets = np.cumsum([0] + [len(source) for source in self.sources])
        targets = {f"image{i}": "image" for i in range(1, num_frames)} | {f"mask{i}": "mask" for i in range(1, num_frames)}
        self.transform = A.Compose([
            A.Affine(scale=(0.9, 1.1), rotate=(-10, 10), shear=(-5, 5), fill=0, fill_mask=0, p=1.0),
            A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
            A.RandomCrop(crop_size, crop_size),
            A.HorizontalFlip(),
        ], additional_targets=targets)
        self.deform = A.Perspective(scale=(0.0, static_deformation), keep_size=True, border_mode=cv2.BORDER_CONSTANT,
                                    fill=0, fill_mask=0, p=1.0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def skip(self, epoch: int) -> int:
        return min(self.max_skip, epoch // self.skip_every_epochs)

    def source_of(self, index: int) -> tuple[ClipSource, SequenceRecord]:
        position = int(np.searchsorted(self.offsets, index, side="right")) - 1
        source = self.sources[position]
        return source, source.records[(index - int(self.offsets[position])) % len(source.records)]

    def _read(self, source: ClipSource, record: SequenceRecord, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if source.static:
            image, labels = read_image(record.frames[0]), read_annotation(record.annotations[0])
            images, masks = [image], [labels]
            for _ in range(1, self.num_frames):  # each frame a deformation of the previous one
                self.deform.set_random_seed(self.draw_seed())
                out = self.deform(image=images[-1], mask=masks[-1])
                images.append(out["image"])
                masks.append(out["mask"])
            return images, masks
        chosen = clip_frames(len(record.frames), self.num_frames, self.skip(epoch) // source.frame_step, self.generator)
        return [read_image(record.frames[t]) for t in chosen], [read_annotation(record.annotations[t]) for t in chosen]

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, index = split_epoch_index(index, len(self))
        source, record = self.source_of(index)
        images, labels = self._read(source, record, epoch)
        for _ in range(20):
            self.transform.set_random_seed(self.draw_seed())
            out = self.transform(image=images[0], mask=labels[0],
                                 **{f"image{i}": images[i] for i in range(1, self.num_frames)},
                                 **{f"mask{i}": labels[i] for i in range(1, self.num_frames)})
            masks = np.stack([out["mask"]] + [out[f"mask{i}"] for i in range(1, self.num_frames)])
            objects = [k for k in np.unique(masks[0]) if 0 < k < 255][: self.max_objects]
            if objects:
                break
        relabelled = np.where(masks == 255, 255, 0).astype(np.int64)
        for new, old in enumerate(objects, start=1):
            relabelled[masks == old] = new
        frames = [out["image"]] + [out[f"image{i}"] for i in range(1, self.num_frames)]
        return {"frames": torch.stack([frame_tensor(f) for f in frames]), "masks": torch.from_numpy(relabelled),
                "num_objects": len(objects)}
