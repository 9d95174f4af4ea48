"""The training samples of CSTP (Zhang, Po et al., "Contrastive Spatio-Temporal Pretext Learning
for Self-supervised Video Representation", AAAI 2022, arXiv 2112.08913): two clips of one video
whose spatio-temporal overlap rate (STOR) is the pretext label, plus the pace and rotation labels.

Written from the released code (Katou2/CSTP @e28b08db21, ``UcfRepreBYOLSpPre`` and
``ClipRandomSizedCropOverlap``; method card §9):

- **Pace** p ∈ ``paces`` = (1, 2, 4, 8), label its index, drawn uniformly among the paces with
  (num_frames − 1)·p ≤ the video's length (:func:`draw_pace_label`). Both clips share it; it
  replaces the DataModule's ``frame_stride``.
- **Temporal overlap** r_t ∈ ``temporal_overlaps`` = (1.0, 0.8, 0.6, 0.4, 0.2), label its index.
  Clip 1 starts at a random position with its whole span inside the video; clip 2 starts
  (1 − r_t)·(num_frames − 1)·p frames before or after it (:func:`temporal_offset`), the side a
  coin flip; a start outside the video re-draws the rate and the side together (the code's loop),
  which biases the labels of short videos towards high overlaps. A video shorter than one clip
  span gives two clips of the same frames and label 0.
- **Spatial overlap** r_s ∈ ``spatial_overlaps`` = (1.0, …, 0.2), label its index. Crop 1 is a
  random resized crop (area ``crop_scale``, aspect 3/4–4/3) of the resized frames; crop 2 has its
  size and is shifted towards one of the four corners so that the intersection covers r_s of the
  crop area (intersection over crop area, not IoU): the overlap width w_o is drawn in
  [r_s·w, w] and its height is r_s·w·h / w_o (:func:`overlap_crop_box`). A crop 2 outside the frame
  re-draws rate, corner and width together, as the code does (:func:`draw_overlap_crop`). Both
  crops are resized to ``image_size``².
- **Rotation**: each clip its own label k ∈ {0, 1, 2, 3}, a rotation by k·90° (counter-clockwise).
- **Augmentation**: with probability ``strong_augment_p`` = 0.3 (per clip) a rotation by an angle
  in ±``strong_rotation`` = 10°, MoCo-v2 colour augmentation ``color`` (jitter 0.4/0.4/0.4/0.1 with
  probability 0.8, grayscale 0.2, blur 0.5) and a flip; otherwise a flip only.

Deviations from the code, each to keep a label true to what the network sees:

- The temporal offset is rounded to whole clip steps, round((1 − r_t)·(num_frames − 1))·p. The code
  truncates (1 − r_t)·15·p, and since 1 − 0.8 is 0.19999… in floating point its r_t = 0.8 offset is
  2 frames at p = 1 and 5 at p = 2 (no frame shared), not 3·p. For 16 frames the rounded offsets are
  3p, 6p, 9p, 12p: 13, 10, 7, 4 of the 16 frames shared.
- The rotation label is applied last, to the square crop after the flip. The code rotates the
  whole frames before cropping (crop 2's box then lies in a frame of another shape when the two
  rotations differ) and flips after rotating, which makes 90° and 270° indistinguishable
  (a flipped 90° rotation is a 270° rotation of the flipped image).
- Crop 1 uses :func:`datamodules.clips.random_resized_crop_box` (log-uniform aspect ratio, the
  centre crop after 10 failed tries); the code draws the aspect uniformly, swaps w and h with
  probability 0.5, and retries until it fits. Frames are normalised with the ImageNet mean and std
  (the code scales to [−1, 1]). The crops are drawn on the decoded frames at their own size, as
  the code does (``crop_from: resized`` resizes them to the DataModule's ``resize`` first).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from datamodules.clips import (
    ColorAugment, as_clip, clip_indices, clip_span, coin, crop_resize, random_resized_crop_box,
    random_start, resize_short_side, to_model_input,
)
from datamodules.formats.video import VideoReader
from datamodules.clips import ClipSampler, ClipSpec, VideoRecord

Box = tuple[int, int, int, int]  # (top, left, height, width)

OVERLAP_RATES = (1.0, 0.8, 0.6, 0.4, 0.2)
PACES = (1, 2, 4, 8)
NUM_ROTATIONS = 4
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def _randint(high: int, generator: torch.Generator, low: int = 0) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


# ----------------------------------------------------------------------------------------- time


def draw_pace_label(length: int, num_frames: int, paces: tuple[int, ...], generator: torch.Generator) -> int:
    """A uniformly drawn index into ``paces`` (increasing) among those whose clip, (num_frames − 1)·p
    frames long, fits in ``length`` frames; 0 when none does."""
    allowed = sum((num_frames - 1) * pace <= length for pace in paces)
    return _randint(max(allowed, 1), generator)


def temporal_offset(rate: float, num_frames: int, pace: int) -> int:
    """Frames between the starts of two clips of ``num_frames`` frames ``pace`` apart that share
    the fraction ``rate`` of their extent: (1 − rate)·(num_frames − 1) rounded to whole steps, times pace."""
    return round((1.0 - rate) * (num_frames - 1)) * pace


def draw_temporal_pair(
    length: int, num_frames: int, pace: int, rates: tuple[float, ...], generator: torch.Generator
) -> tuple[int, int, int]:
    """(start of clip 1, start of clip 2, temporal label): clip 1 at a random start with its span
    inside the video, clip 2 :func:`temporal_offset` before or after it, rate and side re-drawn
    until clip 2's span is inside the video too. ``rates[0]`` must be 1.0 (always fits)."""
    span = clip_span(num_frames, pace)
    if length < span:
        return 0, 0, 0
    start = random_start(length, span, generator)
    while True:
        label = _randint(len(rates), generator)
        offset = temporal_offset(rates[label], num_frames, pace)
        second = start - offset if coin(0.5, generator) else start + offset
        if 0 <= second <= length - span:
            return start, second, label


# ---------------------------------------------------------------------------------------- space


def overlap_crop_box(box: Box, rate: float, corner: int, overlap_width: int) -> Box:
    """Crop 2 of the same size as ``box`` (top, left, h, w), shifted towards corner ``corner``
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) so that the two intersect in an
    ``overlap_width`` × round(rate·w·h / overlap_width) rectangle (capped at h), i.e. ``rate`` of
    the crop area up to rounding. ``overlap_width`` must lie in [rate·w, w]."""
    top, left, h, w = box
    overlap_height = min(h, round(rate * w * h / overlap_width))
    dx, dy = w - overlap_width, h - overlap_height
    shift_left, shift_up = corner in (0, 2), corner in (0, 1)
    return top - dy if shift_up else top + dy, left - dx if shift_left else left + dx, h, w


def box_inside(box: Box, height: int, width: int) -> bool:
    top, left, h, w = box
    return top >= 0 and left >= 0 and top + h <= height and left + w <= width


def draw_overlap_crop(
    box: Box, height: int, width: int, rates: tuple[float, ...], generator: torch.Generator
) -> tuple[Box, int]:
    """(crop 2, spatial label) for crop 1 ``box`` in a ``height`` × ``width`` frame: rate, corner and
    overlap width (uniform in [⌈rate·w⌉, w]) re-drawn together until crop 2 is inside the frame.
    ``rates[0]`` must be 1.0 (crop 2 = crop 1, always fits)."""
    w = box[3]
    while True:
        label = _randint(len(rates), generator)
        corner = _randint(len(CORNERS), generator)
        overlap_width = _randint(w + 1, generator, low=math.ceil(rates[label] * w))
        second = overlap_crop_box(box, rates[label], corner, overlap_width)
        if box_inside(second, height, width):
            return second, label


# ----------------------------------------------------------------------------------------- clip


class STORClips(ClipSampler):
    """Two clips of one video with their STOR, pace and rotation labels (module docstring).

    Returns ``clip1``, ``clip2`` float [3, T, H, W] (ImageNet-normalised, T = ``spec.num_frames``,
    H = W = ``spec.image_size``), and the labels as ints: ``spatial_label`` (index into
    ``spatial_overlaps``), ``temporal_label`` (index into ``temporal_overlaps``), ``pace_label``
    (index into ``paces``, shared by both clips), ``rotation_label1``, ``rotation_label2``
    (k of k·90°). ``spec.frame_stride`` is not used: the pace is the stride.
    """

    def __init__(
        self,
        paces: tuple[int, ...] = PACES,
        temporal_overlaps: tuple[float, ...] = OVERLAP_RATES,
        spatial_overlaps: tuple[float, ...] = OVERLAP_RATES,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_from: Literal["resized", "full"] = "full",
        strong_augment_p: float = 0.3,
        strong_rotation: float = 10.0,
        color: ColorAugment = ColorAugment(),
    ) -> None:
        super().__init__(crop_scale, crop_from)
        if list(paces) != sorted(paces) or paces[0] < 1:
            raise ValueError(f"paces must be increasing positive integers, got {paces}")
        for name, rates in (("temporal_overlaps", temporal_overlaps), ("spatial_overlaps", spatial_overlaps)):
            if rates[0] != 1.0 or not all(0.0 < r <= 1.0 for r in rates):
                raise ValueError(f"{name} must start with 1.0 (the label of full overlap) and lie in (0, 1], got {rates}")
        self.paces = tuple(paces)
        self.temporal_overlaps = tuple(temporal_overlaps)
        self.spatial_overlaps = tuple(spatial_overlaps)
        self.strong_augment_p = strong_augment_p
        self.strong_rotation = strong_rotation
        self.color = color

    def __call__(self, video: VideoReader, record: VideoRecord, spec: ClipSpec, generator: torch.Generator) -> dict[str, Any]:
        length, num_frames = len(video), spec.num_frames
        pace_label = draw_pace_label(length, num_frames, self.paces, generator)
        pace = self.paces[pace_label]
        start1, start2, temporal_label = draw_temporal_pair(length, num_frames, pace, self.temporal_overlaps, generator)
        indices = clip_indices(start1, num_frames, pace, length) + clip_indices(start2, num_frames, pace, length)
        decoded = video.frames(indices)
        frames = resize_short_side(as_clip(decoded), self.crop_source_size(decoded, spec))
        height, width = frames.shape[-2:]
        box1 = random_resized_crop_box(height, width, generator, self.crop_scale)
        box2, spatial_label = draw_overlap_crop(box1, height, width, self.spatial_overlaps, generator)
        clip1, rotation1 = self._view(crop_resize(frames[:num_frames], box1, spec.image_size), generator)
        clip2, rotation2 = self._view(crop_resize(frames[num_frames:], box2, spec.image_size), generator)
        return {
            "clip1": clip1, "clip2": clip2,
            "spatial_label": spatial_label, "temporal_label": temporal_label, "pace_label": pace_label,
            "rotation_label1": rotation1, "rotation_label2": rotation2,
        }

    def _view(self, clip: Tensor, generator: torch.Generator) -> tuple[Tensor, int]:
        """Augment one uint8 crop [T, 3, S, S] (strong with probability ``strong_augment_p``, else a
        flip), then rotate it by its label's k·90°; returns the model input and k."""
        if coin(self.strong_augment_p, generator):
            angle = float(torch.empty(()).uniform_(-self.strong_rotation, self.strong_rotation, generator=generator))
            clip = self.color(TF.rotate(clip, angle), generator)
        if coin(0.5, generator):
            clip = TF.horizontal_flip(clip)
        rotation = _randint(NUM_ROTATIONS, generator)
        return to_model_input(torch.rot90(clip, rotation, dims=(-2, -1))), rotation
