"""Clip sampling in time and clip augmentation in space, shared by the video DataModules and
their pretext samplers: a dataset's videos (:class:`VideoRecord`), the clip geometry of a
DataModule (:class:`ClipSpec`), and the training sampler that pretext tasks subclass
(:class:`ClipSampler`).

A clip is ``num_frames`` frames ``frame_stride`` apart; it spans (num_frames − 1)·stride + 1
frames. Frames past the end of a short video repeat its last frame. Every spatial transform
draws its parameters once per clip and applies them to all of its frames, and every random
number comes from a ``torch.Generator`` the caller owns (:mod:`datamodules.resumable`).
Frames come in as RGB uint8 tensors [T, H, W, 3] and leave as float [3, T, H, W] normalised
with the ImageNet mean and std (:func:`to_model_input`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from datamodules.formats.video import VideoReader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def clip_span(num_frames: int, frame_stride: int) -> int:
    return (num_frames - 1) * frame_stride + 1


def clip_indices(start: int, num_frames: int, frame_stride: int, length: int) -> list[int]:
    """Frame indices of the clip starting at ``start``; past the end, the last frame repeats."""
    return [min(start + k * frame_stride, length - 1) for k in range(num_frames)]


def random_start(length: int, span: int, generator: torch.Generator) -> int:
    """A uniformly random start with the whole span inside the video (0 when it is shorter)."""
    return int(torch.randint(max(length - span, 0) + 1, (), generator=generator))


def uniform_starts(length: int, span: int, count: int) -> list[int]:
    """``count`` evenly spaced starts: clip centres at linspace(span/2, length − span/2, count),
    VCOP's ``retrieve_clips.py`` and the usual 10-clip video-level test."""
    if length <= span:
        return [0] * count
    centres = np.linspace(span / 2, length - span / 2, count)
    return [int(round(c - span / 2)) for c in centres]


def as_clip(frames: np.ndarray | Tensor) -> Tensor:
    """RGB uint8 frames [T, H, W, 3] as a uint8 tensor [T, 3, H, W] (torchvision's video layout)."""
    return torch.as_tensor(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def resize_short_side(clip: Tensor, size: int) -> Tensor:
    return TF.resize(clip, [size], antialias=True)


def random_resized_crop_box(
    height: int, width: int, generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), torchvision's RandomResizedCrop rule with 10 tries then the centre crop."""
    area = height * width
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(*scale, generator=generator))
        log_ratio = torch.empty(()).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
        aspect = math.exp(float(log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (), generator=generator))
            left = int(torch.randint(width - w + 1, (), generator=generator))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(clip: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    top, left, h, w = box
    return TF.resized_crop(clip, top, left, h, w, [size, size], antialias=True)


def center_crop(clip: Tensor, size: int) -> Tensor:
    return TF.center_crop(clip, [size, size])


def coin(p: float, generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < p


@dataclass(frozen=True)
class ColorAugment:
    """MoCo-v2's colour augmentation, one draw for the whole clip: ColorJitter(brightness,
    contrast, saturation, hue) = ``jitter`` with probability ``p_jitter``, grayscale with
    ``p_gray``, Gaussian blur of σ in ``blur_sigma`` with ``p_blur`` (defaults: MoCo v2)."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        for name in ("p_jitter", "p_gray", "p_blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"color.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"color.jitter must be 4 non-negative strengths (brightness, contrast, saturation, hue <= 0.5), "
                             f"got {self.jitter}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"color.blur_sigma must be (low, high) with 0 < low <= high, got {self.blur_sigma}")

    def __call__(self, clip: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 frames [T, 3, H, W], augmented."""
        if coin(self.p_jitter, generator):
            brightness, contrast, saturation, hue = self.jitter
            factor = lambda strength: float(torch.empty(()).uniform_(max(0.0, 1 - strength), 1 + strength, generator=generator))  # noqa: E731
            clip = TF.adjust_brightness(clip, factor(brightness))
            clip = TF.adjust_contrast(clip, factor(contrast))
            clip = TF.adjust_saturation(clip, factor(saturation))
            clip = TF.adjust_hue(clip, float(torch.empty(()).uniform_(-hue, hue, generator=generator)))
        if coin(self.p_gray, generator):
            clip = TF.rgb_to_grayscale(clip, num_output_channels=3)
        if coin(self.p_blur, generator):
            sigma = float(torch.empty(()).uniform_(*self.blur_sigma, generator=generator))
            kernel = 2 * math.ceil(2 * sigma) + 1
            clip = TF.gaussian_blur(clip, [kernel, kernel], [sigma, sigma])
        return clip


def to_model_input(clip: Tensor) -> Tensor:
    """uint8 [T, 3, H, W] → float [3, T, H, W], ImageNet-normalised."""
    clip = TF.normalize(clip.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    return clip.permute(1, 0, 2, 3).contiguous()


def train_clip(frames: np.ndarray, size: int, generator: torch.Generator, scale: tuple[float, float] = (0.2, 1.0),
               resize: int | None = None, flip: bool = True) -> Tensor:
    """The usual training view: resize the short side to ``resize`` (if given), a random
    resized crop to ``size``², a horizontal flip with probability 0.5."""
    clip = as_clip(frames)
    if resize is not None:
        clip = resize_short_side(clip, resize)
    clip = crop_resize(clip, random_resized_crop_box(*clip.shape[-2:], generator, scale), size)
    if flip and coin(0.5, generator):
        clip = TF.horizontal_flip(clip)
    return to_model_input(clip)


def eval_clip(frames: np.ndarray, size: int, resize: int) -> Tensor:
    """The usual test view: the short side resized to ``resize``, the centre ``size``² crop."""
    return to_model_input(center_crop(resize_short_side(as_clip(frames), resize), size))


# --------------------------------------------------------------------------- videos, geometry, samplers


@dataclass(frozen=True)
class VideoRecord:
    """One video of a dataset's list: its file, its 0-based label, its path as listed (relative
    to the dataset's video folder) and the dataset's root, beside which derived trees (CMD's
    re-encoded videos) live."""

    path: Path
    label: int
    name: str
    root: Path

    @property
    def video_folder(self) -> Path:
        """The folder that ``name`` is relative to (``<root>/UCF-101`` for UCF101)."""
        return self.path.parents[len(Path(self.name).parts) - 1]


@dataclass(frozen=True)
class ClipSpec:
    """The clip geometry of a DataModule: ``num_frames`` frames ``frame_stride`` apart, the
    short side resized to ``resize``, crops of ``image_size``²."""

    num_frames: int
    frame_stride: int
    image_size: int
    resize: int

    @property
    def span(self) -> int:
        return clip_span(self.num_frames, self.frame_stride)


class ClipSampler:
    """One training sample from one video: a clip of the DataModule's :class:`ClipSpec` at a
    random position, randomly crop-resized (area fraction ``crop_scale``) and flipped, as dict
    ``video`` [3, T, H, W]. Pretext samplers subclass it, keep their own options in
    ``__init__`` and return their own fields.

    ``crop_from``: the crop box is drawn on the frames with their short side resized to the
    spec's ``resize`` (``resized``), or on the decoded frames as they are (``full``, as the CMD
    and CSTP code do: their 128-pixel rescale is for validation). An area fraction selects the
    same region either way; the crop is resampled to ``image_size`` once from full resolution
    rather than twice."""

    def __init__(self, crop_scale: tuple[float, float] = (0.2, 1.0), crop_from: Literal["resized", "full"] = "resized") -> None:
        if crop_from not in ("resized", "full"):
            raise ValueError(f"crop_from must be 'resized' or 'full', got {crop_from!r}")
        self.crop_scale = crop_scale
        self.crop_from = crop_from

    def crop_source_size(self, frames: np.ndarray | Tensor, spec: ClipSpec) -> int:
        """The short side the crop box is drawn on: the spec's ``resize``, or the frames' own.
        ``frames`` are decoded frames [T, H, W, 3]."""
        return spec.resize if self.crop_from == "resized" else min(frames.shape[1], frames.shape[2])

    def __call__(self, video: VideoReader, record: VideoRecord, spec: ClipSpec, generator: torch.Generator) -> dict[str, Any]:
        start = random_start(len(video), spec.span, generator)
        frames = video.frames(clip_indices(start, spec.num_frames, spec.frame_stride, len(video)))
        return {"video": train_clip(frames, spec.image_size, generator, self.crop_scale, self.crop_source_size(frames, spec))}
