"""CSTP's prediction heads (Zhang, Po et al., AAAI 2022; released code Katou2/CSTP,
``models/pace/r21d_byol.py``), on the online backbone features (before the projector):

- spatial overlap and temporal overlap: an MLP on concat(f1, f2), 2D → 2D (BN, ReLU) → classes;
- playback pace and rotation: one MLP per task shared by both clips, D → D (BN, ReLU) → classes.

The code gives every head 5 outputs although pace and rotation have 4 classes (the fifth logit is
never a target, so it only learns to stay low); ``clip_classes`` = 5 keeps this over-provisioning,
4 drops it. The overlap heads have one class per overlap rate (5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.nn.byol import MLP


class STORHeads(nn.Module):
    """Logits of the four pretext tasks from the features f1, f2 [B, D] of the two clips:
    ``spatial``, ``temporal`` [B, pair_classes] and ``pace1``, ``pace2``, ``rotation1``,
    ``rotation2`` [B, clip_classes]."""

    def __init__(self, features: int = 512, pair_classes: int = 5, clip_classes: int = 5) -> None:
        super().__init__()
        self.spatial = MLP(2 * features, 2 * features, pair_classes)
        self.temporal = MLP(2 * features, 2 * features, pair_classes)
        self.pace = MLP(features, features, clip_classes)
        self.rotation = MLP(features, features, clip_classes)

    def forward(self, features1: Tensor, features2: Tensor) -> dict[str, Tensor]:
        pair = torch.cat([features1, features2], dim=1)
        return {
            "spatial": self.spatial(pair), "temporal": self.temporal(pair),
            "pace1": self.pace(features1), "pace2": self.pace(features2),
            "rotation1": self.rotation(features1), "rotation2": self.rotation(features2),
        }
