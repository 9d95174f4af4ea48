"""SeCo's training sample (Yao et al., "SeCo: Exploring Sequence Supervision for Unsupervised
Representation Learning", AAAI 2021, arXiv 2008.00975; authors' ``dataset_kinetics_v2.py``,
``KineticsClipFolderDatasetV2Order``).

The frames of a video are split into two halves, [0, n // 2) and [n // 2, n) (the second
half takes the odd frame). With one coin flip the query frame is drawn in the first half
(``order_label`` 0) or the second (``order_label`` 1); two frames are drawn from the *other*
half, independently (they may coincide, as in the authors' code), and sorted by time. Four
images come out, each with its own MoCo-v2 augmentation (RandomResizedCrop to ``image_size``
with area scale 0.2–1, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, Gaussian
blur σ ∈ [0.1, 2] p 0.5, horizontal flip p 0.5), each normalised with the ImageNet mean/std:

- ``query`` [3, H, W]: the query frame x_q;
- ``positive`` [3, H, W]: the same frame, another augmentation (x1);
- ``other_early``, ``other_late`` [3, H, W]: the two frames of the other half in time order
  (x2 ≤ x3);
- ``order_label``: 0 when the query comes from the first half, else 1;
- ``frame_index`` [3]: the frame indices of query, other_early, other_late.

The authors read Kinetics frame folders of ~30 frames at a 256-pixel short side; here frames
are decoded from the video (all of its frames are candidates) and the short side is resized
to the DataModule's ``resize`` before the crop.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from datamodules.clips import (
    ColorAugment, as_clip, coin, crop_resize, random_resized_crop_box, resize_short_side, to_model_input,
)
from datamodules.formats.images import CorruptFileError
from datamodules.formats.video import VideoReader
from datamodules.clips import ClipSampler, ClipSpec, VideoRecord


class SeCoFrames(ClipSampler):
    """Query, positive and two other-half frames of one video, with the order label (see the
    module docstring). The options are the MoCo-v2 augmentation's."""

    def __init__(
        self,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        color: ColorAugment = ColorAugment(),
        flip: bool = True,
    ) -> None:
        super().__init__(crop_scale)
        self.color = color
        self.flip = flip

    @staticmethod
    def frame_choice(length: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """(query, other_early, other_late, order_label) for a video of ``length`` frames."""
        if length < 2:
            raise ValueError(f"SeCo needs videos of at least 2 frames, got {length}")
        half = length // 2
        halves = ((0, half), (half, length))
        order_label = int(torch.randint(2, (), generator=generator))
        (q_low, q_high), (o_low, o_high) = halves[order_label], halves[1 - order_label]
        query = int(torch.randint(q_low, q_high, (), generator=generator))
        early, late = sorted(int(torch.randint(o_low, o_high, (), generator=generator)) for _ in range(2))
        return query, early, late, order_label

    def augment(self, frame: Tensor, size: int, generator: torch.Generator) -> Tensor:
        """One MoCo-v2 view [3, size, size] (float, normalised) of a uint8 frame [3, H, W]."""
        view = crop_resize(frame[None], random_resized_crop_box(*frame.shape[-2:], generator, self.crop_scale), size)
        view = self.color(view, generator)
        if self.flip and coin(0.5, generator):
            view = TF.horizontal_flip(view)
        return to_model_input(view)[:, 0]

    def __call__(self, video: VideoReader, record: VideoRecord, spec: ClipSpec, generator: torch.Generator) -> dict[str, Any]:
        if len(video) < 2:
            raise CorruptFileError(f"{record.path} has {len(video)} frame(s); SeCo needs at least 2")
        query, early, late, order_label = self.frame_choice(len(video), generator)
        frames = resize_short_side(as_clip(video.frames([query, early, late])), spec.resize)
        return {
            "query": self.augment(frames[0], spec.image_size, generator),
            "positive": self.augment(frames[0], spec.image_size, generator),
            "other_early": self.augment(frames[1], spec.image_size, generator),
            "other_late": self.augment(frames[2], spec.image_size, generator),
            "order_label": order_label,
            "frame_index": torch.tensor([query, early, late]),
        }
