"""CorrTracker: FairMOT with correlation learning (Wang, Zheng, Pan, Xu, "Multiple Object
Tracking with Correlation Learning", CVPR 2021, arXiv 2104.03541; method card 6b). Plain torch
parts in :mod:`lightning_modules.nn.correlation`.

No authors' code is public. The two additions and their constraint are the abstract's; every
internal below is the card's reconstruction [UNVERIFIED], each switchable:

1. FairMOT's DLA backbone gives features at strides 4, 8, 16 and 32.
2. Spatial correlation (``spatial_levels``, strides 8, 16, 32 by default): each level's local
   self-correlation volume ((2R+1)² displacements, R = ``radius`` 3) and the correlation-weighted
   context of its neighbours are fused back into it (1×1 convolution, added; zero at the start).
3. Temporal correlation (``temporal_levels``, strides 16 and 32): each level is correlated with
   the previous frame's same level, which the softmax of the volume aligns; fused back the same
   way. In training the previous frame passes the backbone without gradient; in tracking its
   levels are kept from the previous step (the first frame is its own previous).
4. The neck merges the levels and FairMOT's heads, losses and tracker follow (card 6a).
5. Self-supervised constraint (``reconstruction_weight`` λ, 1.0): the current image rebuilt
   from the previous image by each temporal volume, and each pixel from its neighbours by each
   spatial volume (the centre masked out), L1 at the level's resolution; L = L_FairMOT + λ·mean.

Training data: ``data.previous_frame: true`` (the frame before each training frame, under the
same augmentation).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from datamodules.mot17 import letterbox
from datamodules.vos_clips import frame_tensor
from lightning_modules.mot.fairmot import FairMOT
from lightning_modules.nn.correlation import SpatialCorrelation, TemporalCorrelation, reconstruction_loss


class CorrTracker(FairMOT):
    """CorrTracker (module docstring): FairMOT's arguments, plus the levels (0-3: strides 4-32) of
    the spatial and temporal correlations (empty switches one off), their ``radius`` and λ."""

    method_name = "corrtracker"

    def __init__(
        self,
        spatial_levels: tuple[int, ...] = (1, 2, 3),
        temporal_levels: tuple[int, ...] = (2, 3),
        radius: int = 3,
        reconstruction_weight: float = 1.0,
        **fairmot_arguments: Any,
    ) -> None:
        """CorrTracker's levels, radius and λ; ``fairmot_arguments`` are FairMOT's (backbone,
        heads, losses, ``tracker``, ``optim`` ...)."""
        super().__init__(**fairmot_arguments)
        channels = self.network.level_channels
        for level in (*spatial_levels, *temporal_levels):
            if not 0 <= level < len(channels):
                raise ValueError(f"model.spatial_levels / temporal_levels: level {level} is not one of 0..{len(channels) - 1}")
        self.spatial = nn.ModuleDict({str(k): SpatialCorrelation(channels[k], radius) for k in spatial_levels})
        self.temporal = nn.ModuleDict({str(k): TemporalCorrelation(channels[k], radius) for k in temporal_levels})

    def correlated(self, images: Tensor, previous_levels: Optional[list[Tensor]]) -> tuple[dict[str, Tensor], dict[str, list]]:
        """The heads' maps of images with the correlations applied to their levels, and the
        volumes {"spatial": [(level, volume)], "temporal": [...]}; ``previous_levels`` None
        correlates each frame with itself."""
        levels = self.network.levels(images)
        previous = previous_levels if previous_levels is not None else [level.detach() for level in levels]
        volumes: dict[str, list] = {"spatial": [], "temporal": []}
        fused = list(levels)
        for key, module in self.temporal.items():
            fused[int(key)], volume = module(fused[int(key)], previous[int(key)])
            volumes["temporal"].append((int(key), volume))
        for key, module in self.spatial.items():
            fused[int(key)], volume = module(fused[int(key)])
            volumes["spatial"].append((int(key), volume))
        features = self.network.merge(fused)
        return {name: layer(features) for name, layer in self.heads.items()}, volumes | {"levels": levels}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.correlated(images, None)[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        previous_images = batch.get("previous_image")
        if previous_images is None and len(self.temporal):
            raise ValueError("CorrTracker's temporal correlation trains on frame pairs: set data.previous_frame true")
        previous_levels = None
        if previous_images is not None:
            with torch.no_grad():
                previous_levels = self.network.levels(previous_images)
        outputs, volumes = self.correlated(images, previous_levels)
        losses = self.losses(outputs, batch["boxes"], batch["track_ids"])
        terms = [reconstruction_loss(v, previous_images, images, self.hparams.radius) for _, v in volumes["temporal"]]
        terms += [reconstruction_loss(v, images, images, self.hparams.radius, exclude_centre=True) for _, v in volumes["spatial"]]
        reconstruction = torch.stack(terms).mean() if terms else images.new_zeros(())
        loss = losses["loss"] + self.hparams.reconstruction_weight * reconstruction
        size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{name}_loss": value for name, value in losses.items() if name != "loss"}
                      | {"train/reconstruction_loss": reconstruction}, batch_size=size)
        return loss

    @torch.no_grad()
    def detect(self, frame: np.ndarray, input_size: tuple[int, int],
               state: Optional[dict[str, Any]] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FairMOT's detection with the previous frame's levels from ``state`` (then replaced)."""
        boxed, scale, offset = letterbox(frame, input_size)
        images = frame_tensor(boxed)[None].to(self.device)
        outputs, volumes = self.correlated(images, state.get("previous_levels") if state else None)
        if state is not None:
            state["previous_levels"] = volumes["levels"]
        return self.decode({k: v[0] for k, v in outputs.items()}, scale, offset)
