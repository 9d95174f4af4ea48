"""Global descriptors for image retrieval: GeM pooling and the GeM embedding of a CNN.

GeM (Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation",
TPAMI 2018): f_c = (mean over positions of x_c^p)^(1/p), p learnable (init 3; 1 is average,
∞ max pooling), activations clamped at ``eps`` first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GeM(nn.Module):
    """Generalised-mean pooling of [B, C, H, W] → [B, C], with a learnable (or fixed) p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}, learnable={self.p.requires_grad}"


class GeMEmbedding(nn.Module):
    """``backbone`` (a feature map [B, C, H, W], timm's ``global_pool=""``) → GeM → the whitening
    FC to ``embedding_size`` → BatchNorm1d → L2-normalised [B, embedding_size]."""

    def __init__(self, backbone: nn.Module, num_features: int, embedding_size: int, p: float = 3.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = GeM(p)
        self.whiten = nn.Linear(num_features, embedding_size)
        self.bn = nn.BatchNorm1d(embedding_size)

    def features(self, images: Tensor) -> Tensor:
        """The embedding before its L2 normalisation (the BatchNorm's output)."""
        return self.bn(self.whiten(self.pool(self.backbone(images))))

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.features(images), dim=1)


def multi_scale(embed: nn.Module, images: Tensor, scales: Sequence[float]) -> Tensor:
    """The L2-normalised sum of ``embed`` over the images resized by each of ``scales`` (bilinear)."""
    total = 0
    for scale in scales:
        resized = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                            align_corners=False, antialias=scale < 1.0)
        total = total + embed(resized)
    return F.normalize(total, dim=1)
