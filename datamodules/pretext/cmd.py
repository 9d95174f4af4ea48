"""CMD's training sample (Huang et al., "Self-supervised Video Representation Learning by Context
and Motion Decoupling", CVPR 2021, arXiv 2104.00862; method card §8): an RGB clip, an I-frame
near it, the motion vectors (MVs) of its near future and of other times of the same video.

[CODE*] Read in a public copy of the authors' code (TonyAlbertWan/CPaR, ``dataset/dataset.py``
``MotionPredictionDataset`` and ``dataset/transforms.py``), not checked against the authors'
repository. Per video, with ``length`` = the frames both the RGB reader and the compressed file
have (the code's ``min(len(video), num_frame)``):

- **RGB clip**: ``num_frames`` frames ``frame_stride`` apart (the DataModule's geometry), its
  start uniform in [0, length − (span + future_interval + future_frames)], leaving room for the
  future window.
- **Positive MV clip**: ``future_frames`` consecutive frames starting ``future_interval + 1``
  frames after the clip's last frame (the code's ``m_indices``): frames ``last + future_interval
  + 1 … last + future_interval + future_frames``.
- **Negative MV clips**: ``num_negatives`` windows of ``future_frames`` frames from the same video
  that do not overlap the positive window and stay ``negative_interval`` frames clear of it
  (:func:`negative_starts`): drawn uniformly among all such start frames, without replacement
  unless there are fewer than ``num_negatives``. They may overlap the RGB clip, as in the code.
- **I-frame**: drawn uniformly among the I-frames within ``iframe_margin`` frames of the clip
  (:meth:`CompressedVideo.iframe_candidates`). The code counts an empty set as a failed sample
  (it returns zeros); here the nearest I-frame of the video is taken instead
  (:meth:`CompressedVideo.nearest_iframe`), which only happens with clips shorter than the GOP.
  CoViAR returns I-frames as BGR and the code hands them to PIL as RGB, so its I-frames are
  channel-swapped; ``swap_iframe_channels`` (default true) reproduces that.

**Short videos.** The code leaves out videos with fewer than span + future_interval +
future_frames frames. A per-video sampler cannot leave a video out, so such a video gets the
clip that starts at frame 0 with the frames past ``length − future_frames − future_interval − 1``
repeating that frame (as :func:`~datamodules.clips.clip_indices` repeats a video's last frame),
and the positive window on the video's last ``future_frames`` frames; the clip still ends before
the future window. A video too short to hold any negative window (fewer than 2·future_frames +
future_interval + negative_interval + 1 frames) raises :class:`CorruptFileError` naming it, so
that ``skip_corrupt`` replaces it (no UCF101 video is that short at the default 8 future frames).

**Augmentation** (card §4; the code's ``Compose`` of RandomCrop min-area 0.2, RandomHFlip,
GaussianBlur p 0.5, ColorJitter p 0.5, RandomGray p 0.2):

- RGB clip: a random crop of area 0.2–1 and aspect 3/4–4/3 of the decoded frames, resized to
  ``image_size``, a flip with p 0.5, :class:`~datamodules.clips.ColorAugment` with jitter (0.4,
  0.4, 0.4, 0.1) p 0.5, grayscale p 0.2, blur σ ∈ [0.1, 2] p 0.5, one draw per clip. As the code,
  the crop is taken at the frames' original size (its 128-pixel rescale is for validation only);
  ``crop_from: resized`` draws it on frames resized to ``resize`` first. The code blurs before the colour jitter and shuffles the four jitter operations;
  :class:`ColorAugment` jitters in a fixed order, then blurs.
- Positive MV clip: the **same** resize, crop box and flip as the RGB clip (:func:`motion_view`),
  resampled bilinearly without changing the values (the code's ``cv2.resize``), the flip mirroring
  the map without negating x (:func:`flip_motion_vectors`),
  then clamped to ±``mv_clamp`` and divided by it (``mv_preprocess``).
- Negative MV clips: each its own random crop box and flip, as the code's ``MRandomCrop`` /
  ``MRandomHFlip`` (``shared_negative_crop=True`` gives them the positive's box and flip).
- I-frame: its own crop box, flip, blur, jitter and grayscale draws (the code's transforms draw
  separately for the I-frame).

Fields: ``video`` [3, T, S, S] and ``iframe`` [3, S, S] (ImageNet-normalised), ``motion``
[2, F, M, M] and ``negative_motion`` [N, 2, F, M, M] in [−1, 1] (M = ``mv_size``, default S),
and the sampled frame indices ``frame_index`` [T], ``iframe_index``, ``motion_start``,
``negative_starts`` [N].

**Input files.** The MVs and I-frames are read with
:class:`~datamodules.formats.compressed_video.CompressedVideo` from ``compressed_root`` /
``<Class>/<video>.avi``, the tree written by ``python -m datamodules.prepare
mpeg4 <root>/UCF-101 <compressed_root>``; a relative ``compressed_root`` is inside the
dataset root (the configs' ``UCF-101-mpeg4``, which the mini UCF101 writer also makes). With
``compressed_root`` None they are read from the listed video itself, which must then already be
MPEG-4 Part 2 without B-frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from datamodules.clips import (
    ColorAugment, as_clip, clip_indices, coin, crop_resize, random_resized_crop_box, resize_short_side, to_model_input,
)
from datamodules.formats.compressed_video import CompressedVideo
from datamodules.formats.images import CorruptFileError
from datamodules.formats.video import VideoReader
from datamodules.clips import ClipSampler, ClipSpec, VideoRecord

Box = tuple[int, int, int, int]


ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


# --- CMD's MV augmentation (dataset/transforms.py) -------------------------------------------------


def mv_preprocess(mv: ArrayT, clamp: float = 10.0) -> ArrayT:
    """CMD's MV normalisation (``Normalize`` / ``MNormalize``): clamp to ``[−clamp, clamp]``, then
    divide by ``clamp``, so that values lie in [−1, 1]."""
    return mv.clip(-clamp, clamp) / clamp


def flip_motion_vectors(mv: ArrayT) -> ArrayT:
    """Mirror MV maps ``[..., H, W, 2]`` left-right exactly as CMD's ``RandomHFlip`` does
    (``u[:, ::-1]`` on each ``[H, W, 2]`` map, shared with the RGB clip's flip): the x-component is
    **not** negated. This is the code's behaviour, reproduced as the card asks, although it is
    physically inconsistent: the mirrored picture of rightward motion moves left, yet keeps
    ``mv_x > 0``."""
    if mv.ndim < 3 or mv.shape[-1] != 2:
        raise ValueError(f"expected MV maps of shape [..., H, W, 2]; got {tuple(mv.shape)}")
    if isinstance(mv, np.ndarray):
        return np.ascontiguousarray(mv[..., ::-1, :])
    return mv.flip(-2)


def negative_starts(
    length: int, positive_start: int, window: int, count: int, generator: torch.Generator, interval: int = 0
) -> list[int]:
    """Start frames of ``count`` windows of ``window`` frames in a video of ``length`` frames that
    end at least ``interval`` frames before the positive window [positive_start, positive_start +
    window) or begin at least ``interval`` frames after it (the code's ``n_candidates``), drawn
    uniformly among all such starts (the distribution of re-drawing a uniform start until it fits),
    without replacement when there are at least ``count``, as the code's ``np.random.choice``.
    Raises ValueError when there is none."""
    before = range(0, positive_start - interval - window + 1)
    after = range(positive_start + window + interval, length - window + 1)
    candidates = torch.tensor([*before, *after], dtype=torch.long)
    if len(candidates) == 0:
        raise ValueError(
            f"no {window}-frame window of a {length}-frame video stays {interval} frames clear of the "
            f"positive window at {positive_start}"
        )
    if len(candidates) >= count:
        chosen = torch.randperm(len(candidates), generator=generator)[:count]
    else:
        chosen = torch.randint(len(candidates), (count,), generator=generator)
    return candidates[chosen].tolist()


def clip_and_future(
    length: int, spec: ClipSpec, future_frames: int, future_interval: int, generator: torch.Generator
) -> tuple[list[int], int]:
    """(the RGB clip's frame indices, the positive MV window's first frame): the clip at a uniform
    start that leaves room for the window, the window ``future_interval + 1`` frames after the
    clip's last frame; a video too short for both gets the short-video rule of the module
    docstring (clip from frame 0, window on the last frames)."""
    gap = future_interval + 1
    room = length - (spec.span + future_interval + future_frames)
    if room >= 0:
        start = int(torch.randint(room + 1, (), generator=generator))
        frames = clip_indices(start, spec.num_frames, spec.frame_stride, length)
        return frames, frames[-1] + gap
    last_allowed = length - future_frames - gap
    if last_allowed < 0:
        raise ValueError(f"a {length}-frame video cannot hold a clip and {future_frames} frames {gap} after it")
    return clip_indices(0, spec.num_frames, spec.frame_stride, last_allowed + 1), last_allowed + gap


def motion_view(
    mv: np.ndarray | Tensor, resize: int, box: Box, size: int, flip: bool, clamp: float
) -> Tensor:
    """An MV clip [F, H, W, 2] in pixels → [2, F, size, size]: the short side resized to
    ``resize`` and the crop ``box`` (top, left, h, w) resized to ``size``², both as the RGB clip's
    :func:`~datamodules.clips.resize_short_side` / :func:`~datamodules.clips.crop_resize`, bilinear
    and without rescaling the values (the code's ``cv2.resize`` of the maps); mirrored left-right
    without negating x when ``flip``; clamped to ±``clamp`` and divided by ``clamp``."""
    maps = torch.as_tensor(mv, dtype=torch.float32).permute(0, 3, 1, 2)
    maps = TF.resize(maps, [resize], interpolation=InterpolationMode.BILINEAR, antialias=False)
    top, left, h, w = box
    maps = TF.resized_crop(maps, top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=False)
    maps = maps.permute(0, 2, 3, 1)
    if flip:
        maps = flip_motion_vectors(maps)
    return mv_preprocess(maps, clamp).permute(3, 0, 1, 2).contiguous()


class ContextMotionClips(ClipSampler):
    """CMD's clip, I-frame, future MV clip and same-video negative MV clips of one video (module
    docstring). Defaults are the code's [CODE*]: 8 future frames 2 after the clip, 3 negatives
    right next to the positive window allowed (``negative_interval`` 0), I-frames within 5 frames,
    MVs clamped at ±10 pixels."""

    def __init__(
        self,
        compressed_root: Optional[str] = None,
        future_frames: int = 8,
        future_interval: int = 2,
        num_negatives: int = 3,
        negative_interval: int = 0,
        iframe_margin: int = 5,
        mv_clamp: float = 10.0,
        mv_size: Optional[int] = None,
        shared_negative_crop: bool = False,
        swap_iframe_channels: bool = True,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_from: Literal["resized", "full"] = "full",
        color: ColorAugment = ColorAugment(p_jitter=0.5),
    ) -> None:
        super().__init__(tuple(crop_scale), crop_from)
        if future_frames < 1 or num_negatives < 0 or future_interval < 0 or negative_interval < 0:
            raise ValueError("future_frames must be positive; num_negatives, future_interval and negative_interval not negative")
        self.compressed_root = None if compressed_root is None else Path(compressed_root)
        self.future_frames = future_frames
        self.future_interval = future_interval
        self.num_negatives = num_negatives
        self.negative_interval = negative_interval
        self.iframe_margin = iframe_margin
        self.mv_clamp = mv_clamp
        self.mv_size = mv_size
        self.shared_negative_crop = shared_negative_crop
        self.swap_iframe_channels = swap_iframe_channels
        self.color = color

    def compressed_path(self, record: VideoRecord) -> Path:
        """The MPEG-4 file of a video: ``compressed_root/<Class>/<video>.avi``, or the video itself."""
        if self.compressed_root is None:
            return record.path
        path = record.root / self.compressed_root / record.name  # an absolute compressed_root wins
        if not path.is_file():
            raise FileNotFoundError(
                f"CMD: the re-encoded video {path} (of {record.path}) is missing; re-encode the videos once with "
                f"`python -m datamodules.prepare mpeg4 {record.video_folder} {record.root / self.compressed_root}`, "
                "or set train_sampler.init_args.compressed_root to null if the videos are already MPEG-4 Part 2 "
                "without B-frames"
            )
        return path

    def _view(self, clip: Tensor, box: Box, flip: bool, size: int, generator: torch.Generator) -> Tensor:
        """uint8 frames [T, 3, H, W] → crop ``box`` resized to ``size``², flipped, colour-augmented,
        normalised [3, T, size, size]."""
        clip = crop_resize(clip, box, size)
        if flip:
            clip = TF.horizontal_flip(clip)
        return to_model_input(self.color(clip, generator))

    def __call__(self, video: VideoReader, record: VideoRecord, spec: ClipSpec, generator: torch.Generator) -> dict[str, Any]:
        compressed = CompressedVideo(self.compressed_path(record))
        length = min(len(video), compressed.num_frames)
        window = self.future_frames
        try:
            frame_index, motion_start = clip_and_future(length, spec, window, self.future_interval, generator)
            negatives = negative_starts(length, motion_start, window, self.num_negatives, generator, self.negative_interval)
        except ValueError as error:
            raise CorruptFileError(f"{record.path} is too short for CMD's sample: {error}") from None
        candidates = compressed.iframe_candidates(frame_index[0], frame_index[-1], self.iframe_margin)
        if candidates:
            iframe_index = candidates[int(torch.randint(len(candidates), (), generator=generator))]
        else:
            iframe_index = compressed.nearest_iframe(frame_index[0], frame_index[-1])

        frames = video.frames(frame_index)
        if frames.shape[1:3] != (compressed.height, compressed.width):
            raise ValueError(
                f"{compressed.path} is {compressed.width}x{compressed.height} but {record.path} is "
                f"{frames.shape[2]}x{frames.shape[1]}; CMD crops both with one box: re-encode without resizing"
            )
        source = self.crop_source_size(frames, spec)
        rgb = resize_short_side(as_clip(frames), source)
        grid = rgb.shape[-2:]  # the resized frame, also the resized MV map
        box, flip = random_resized_crop_box(*grid, generator, self.crop_scale), coin(0.5, generator)
        clip = self._view(rgb, box, flip, spec.image_size, generator)

        starts = [motion_start, *negatives]
        mv = compressed.motion_vectors([s + k for s in starts for k in range(window)])
        mv = mv.reshape(len(starts), window, *mv.shape[1:])
        mv_size = self.mv_size or spec.image_size
        motion = motion_view(mv[0], source, box, mv_size, flip, self.mv_clamp)
        negative = []
        for negative_mv in mv[1:]:
            if self.shared_negative_crop:
                negative_box, negative_flip = box, flip
            else:
                negative_box, negative_flip = random_resized_crop_box(*grid, generator, self.crop_scale), coin(0.5, generator)
            negative.append(motion_view(negative_mv, source, negative_box, mv_size, negative_flip, self.mv_clamp))

        iframe = compressed.iframe(iframe_index)
        if self.swap_iframe_channels:
            iframe = iframe[..., ::-1]
        iframe = resize_short_side(as_clip(iframe[None]), spec.resize)
        iframe_box, iframe_flip = random_resized_crop_box(*iframe.shape[-2:], generator, self.crop_scale), coin(0.5, generator)
        iframe = self._view(iframe, iframe_box, iframe_flip, spec.image_size, generator)[:, 0]

        return {
            "video": clip,
            "iframe": iframe,
            "motion": motion,
            "negative_motion": torch.stack(negative) if negative else motion.new_zeros(0, *motion.shape),
            "frame_index": torch.tensor(frame_index),
            "iframe_index": iframe_index,
            "motion_start": motion_start,
            "negative_starts": torch.tensor(negatives, dtype=torch.long),
        }

