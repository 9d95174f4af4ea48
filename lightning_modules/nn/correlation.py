"""Local correlation volumes and the modules CorrTracker builds on them (Wang, Zheng, Pan, Xu,
"Multiple Object Tracking with Correlation Learning", CVPR 2021; method card 6b). No authors'
code is public: the operator is the FlowNet/PWC-style local cost volume the card describes; the
fusion and the self-supervised constraint are the card's reconstruction [UNVERIFIED].

- :func:`local_correlation`: C(x, d) = ⟨a(x), b(x + d)⟩ / √C for d in a (2R+1)² window (zero
  outside the map), [B, (2R+1)², H, W], displacements in row-major order (dy, then dx).
- :func:`aggregate`: Σ_d w(x, d) v(x + d), the softmax-weighted sum of a map's neighbours.
- :class:`SpatialCorrelation`: a level's features correlated with themselves; the volume and the
  correlation-weighted aggregate of the neighbours (the centre left out) fused back by a 1×1
  convolution added to the features.
- :class:`TemporalCorrelation`: the current features correlated with the previous frame's; the
  previous features aligned by the softmax of the volume, fused back the same way.
- :func:`reconstruction_loss`: the self-supervised constraint on a volume: the target image (at
  the level's resolution) rebuilt from the source image by the volume's softmax weights, L1.
  Temporal: the current frame from the previous one; spatial: each pixel from its neighbours,
  the centre displacement masked out so that the identity cannot solve it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _neighbours(values: Tensor, radius: int) -> Tensor:
    """[B, C, (2R+1)², H, W]: ``values`` at every displacement of the window (zero outside)."""
    b, c, h, w = values.shape
    size = 2 * radius + 1
    return F.unfold(values, size, padding=radius).view(b, c, size * size, h, w)


def local_correlation(a: Tensor, b: Tensor, radius: int) -> Tensor:
    """C(x, d) = ⟨a(x), b(x + d)⟩ / √C over the (2R+1)² displacements: [B, (2R+1)², H, W]."""
    return (a[:, :, None] * _neighbours(b, radius)).sum(dim=1) / math.sqrt(a.shape[1])


def aggregate(weights: Tensor, values: Tensor, radius: int) -> Tensor:
    """Σ_d weights(x, d) · values(x + d): weights [B, (2R+1)², H, W], values [B, C, H, W]."""
    return (weights[:, None] * _neighbours(values, radius)).sum(dim=2)


def centre_masked(volume: Tensor) -> Tensor:
    """The volume with the zero displacement at −inf (a softmax over it ignores the centre)."""
    masked = volume.clone()
    masked[:, volume.shape[1] // 2] = float("-inf")
    return masked


class SpatialCorrelation(nn.Module):
    """A level's local self-correlation fused back into it (module docstring)."""

    def __init__(self, channels: int, radius: int = 3) -> None:
        super().__init__()
        self.radius = radius
        self.fuse = nn.Conv2d(channels + (2 * radius + 1) ** 2, channels, 1)
        nn.init.zeros_(self.fuse.weight)  # starts as the identity: the backbone's features unchanged
        nn.init.zeros_(self.fuse.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(fused features, the volume)."""
        volume = local_correlation(features, features, self.radius)
        context = aggregate(centre_masked(volume).softmax(dim=1), features, self.radius)
        return features + self.fuse(torch.cat([context, volume], dim=1)), volume


class TemporalCorrelation(nn.Module):
    """The current level correlated with the previous frame's, which it aligns and fuses back."""

    def __init__(self, channels: int, radius: int = 3) -> None:
        super().__init__()
        self.radius = radius
        self.fuse = nn.Conv2d(channels + (2 * radius + 1) ** 2, channels, 1)
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)

    def forward(self, features: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        volume = local_correlation(features, previous, self.radius)
        aligned = aggregate(volume.softmax(dim=1), previous, self.radius)
        return features + self.fuse(torch.cat([aligned, volume], dim=1)), volume


def reconstruction_loss(volume: Tensor, source: Tensor, target: Tensor, radius: int, exclude_centre: bool = False) -> Tensor:
    """L1 between ``target`` and ``source`` rebuilt by the softmax of ``volume`` (images resized
    to the volume's H × W); ``exclude_centre`` for a spatial volume."""
    size = volume.shape[-2:]
    source, target = (F.interpolate(x, size=size, mode="area") for x in (source, target))
    weights = (centre_masked(volume) if exclude_centre else volume).softmax(dim=1)
    return F.l1_loss(aggregate(weights, source, radius), target)
