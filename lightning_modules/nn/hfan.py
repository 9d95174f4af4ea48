"""HFAN's parts (Pei, Sun, Yao, Shen, Tang, "Hierarchical Feature Alignment Network for
Unsupervised Video Object Segmentation", ECCV 2022; NUST-Machine-Intelligence-Laboratory/HFAN
``mmseg/models/hfan/hfan_vos.py``; method card 5), in plain torch (mmcv's ``ConvModule`` is a
convolution, an optional BatchNorm and a ReLU; :func:`conv_module`).

- :func:`object_regions` (CSS): two region descriptors [B, C, 2, 1] of the image feature, each a
  spatial-softmax-weighted mean under one of the 2-class object logits.
- :class:`PrimaryObjectContext` (POC): mmseg's self-attention block (query: pixel features
  through two conv-BN-ReLU; key and value: the regions; dot products scaled by 1/√d, softmax
  over the 2 regions; value and output projections conv-BN-ReLU), then a conv-BN-ReLU of
  [context ‖ pixel features].
- :class:`FeatureAlignment` (FAM): 2-class logits of the image feature (conv + ReLU, as the
  code's ``ConvModule``), its regions, and POC of the image feature and of the flow feature with
  the *image's* regions.
- :class:`FeatureAdaptation` (FAT): w = σ(channel branch + global branch) of im + fw, each branch
  conv+ReLU → BN → ReLU → conv+ReLU → BN (the code's ``ConvModule`` ReLUs kept), global after
  average pooling; out = 2·im·w + 2·fw·(1 − w).
- :class:`HFANBlock`: FAM then FAT; either switched off gives the code's ``fat``, ``fam`` and
  ``base`` (im + fw) ablations.
- :class:`MLPHead`: SegFormer's all-MLP decoder (per-stage linear to ``embed_dim``, upsampled to
  1/4, [c4 ‖ c3 ‖ c2 ‖ c1] → conv-BN-ReLU → dropout 0.1 → 1×1 conv to 2 classes).
- :class:`HFANNetwork`: one encoder shared by the frame and the flow image (one batch of 2B,
  split after the encoder; its stride 4, 8, 16 and 32 stages), an HFAN block per stage, the head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.backbones import create_backbone


def conv_module(in_channels: int, out_channels: int, norm: bool = True, relu: bool = True) -> nn.Sequential:
    """mmcv's ``ConvModule`` with a 1×1 kernel: conv (bias only without norm), BatchNorm, ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def object_regions(features: Tensor, logits: Tensor, scale: float = 1.0) -> Tensor:
    """Region descriptors [B, C, K, 1]: Σ_x softmax_x(scale·logits_k)(x) · features(x) (CSS)."""
    b, c = features.shape[:2]
    weights = (scale * logits.flatten(2)).softmax(dim=2)  # [B, K, HW]
    return torch.bmm(weights, features.flatten(2).transpose(1, 2)).transpose(1, 2).unsqueeze(3)


class PrimaryObjectContext(nn.Module):
    """POC (module docstring)."""

    def __init__(self, channels: int, inter_channels: int) -> None:
        super().__init__()
        self.query = nn.Sequential(conv_module(channels, inter_channels), conv_module(inter_channels, inter_channels))
        self.key = nn.Sequential(conv_module(channels, inter_channels), conv_module(inter_channels, inter_channels))
        self.value = conv_module(channels, inter_channels)
        self.out = conv_module(inter_channels, channels)
        self.bottleneck = conv_module(2 * channels, channels)

    def forward(self, pixels: Tensor, regions: Tensor) -> Tensor:
        b, _, h, w = pixels.shape
        query = self.query(pixels).flatten(2).transpose(1, 2)  # [B, HW, d]
        key = self.key(regions).flatten(2)  # [B, d, K]
        value = self.value(regions).flatten(2).transpose(1, 2)  # [B, K, d]
        attention = (torch.bmm(query, key) / math.sqrt(key.shape[1])).softmax(dim=-1)  # over the K regions
        context = torch.bmm(attention, value).transpose(1, 2).reshape(b, -1, h, w)
        return self.bottleneck(torch.cat([self.out(context), pixels], dim=1))


class FeatureAlignment(nn.Module):
    """FAM (module docstring): (aligned image feature, aligned flow feature)."""

    def __init__(self, channels: int, inter_channels: int) -> None:
        super().__init__()
        self.object_logits = conv_module(channels, 2, norm=False)
        self.context = PrimaryObjectContext(channels, inter_channels)

    def forward(self, image: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        regions = object_regions(image, self.object_logits(image))
        return self.context(image, regions), self.context(flow, regions)


def _attention_branch(channels: int, inter_channels: int, pooled: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if pooled else []
    layers += [conv_module(channels, inter_channels, norm=False), nn.BatchNorm2d(inter_channels), nn.ReLU(inplace=True),
               conv_module(inter_channels, channels, norm=False), nn.BatchNorm2d(channels)]
    return nn.Sequential(*layers)


class FeatureAdaptation(nn.Module):
    """FAT (module docstring)."""

    def __init__(self, channels: int, inter_channels: int) -> None:
        super().__init__()
        self.channel = _attention_branch(channels, inter_channels, pooled=False)
        self.spatial_mean = _attention_branch(channels, inter_channels, pooled=True)

    def weights(self, image: Tensor, flow: Tensor) -> Tensor:
        fused = image + flow
        return torch.sigmoid(self.channel(fused) + self.spatial_mean(fused))

    def forward(self, image: Tensor, flow: Tensor) -> Tensor:
        w = self.weights(image, flow)
        return 2 * image * w + 2 * flow * (1 - w)


class HFANBlock(nn.Module):
    """FAM then FAT on one stage (module docstring); the authors' inner width is 16
    (``r = channels // 16``, ``inter = channels // r``)."""

    def __init__(self, channels: int, alignment: bool = True, adaptation: bool = True) -> None:
        super().__init__()
        inter = channels // max(1, channels // 16)
        self.alignment = FeatureAlignment(channels, inter) if alignment else None
        self.adaptation = FeatureAdaptation(channels, inter) if adaptation else None

    def forward(self, image: Tensor, flow: Tensor) -> Tensor:
        if self.alignment is not None:
            image, flow = self.alignment(image, flow)
        return self.adaptation(image, flow) if self.adaptation is not None else image + flow


class MLPHead(nn.Module):
    """SegFormer's all-MLP decoder (module docstring)."""

    def __init__(self, in_channels: list[int], embed_dim: int = 768, num_classes: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.linear = nn.ModuleList([nn.Linear(c, embed_dim) for c in in_channels])
        self.fuse = conv_module(embed_dim * len(in_channels), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.predict = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        embedded = []
        for linear, x in zip(self.linear, features):
            b, _, h, w = x.shape
            y = linear(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
            embedded.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False) if (h, w) != size else y)
        return self.predict(self.dropout(self.fuse(torch.cat(embedded[::-1], dim=1))))


class HFANNetwork(nn.Module):
    """Frame and flow image [B, 3, H, W] each → 2-class logits [B, 2, H/4, W/4] (module docstring)."""

    def __init__(self, backbone: str = "pvt_v2_b1", pretrained: bool = True, weights: str | None = None,
                 embed_dim: int = 768, alignment: bool = True, adaptation: bool = True) -> None:
        super().__init__()
        probe = create_backbone(backbone, False, None, features_only=True)
        reductions = list(probe.feature_info.reduction())
        if not {4, 8, 16, 32} <= set(reductions):
            raise ValueError(f"HFAN's head reads stride 4, 8, 16, 32 stages; '{backbone}' gives {reductions}")
        indices = tuple(reductions.index(r) for r in (4, 8, 16, 32))
        self.encoder = create_backbone(backbone, pretrained, weights, features_only=True, out_indices=indices)
        channels = list(self.encoder.feature_info.channels())
        self.blocks = nn.ModuleList([HFANBlock(c, alignment, adaptation) for c in channels])
        self.head = MLPHead(channels, embed_dim)

    def forward(self, frames: Tensor, flows: Tensor) -> Tensor:
        stages = self.encoder(torch.cat([frames, flows], dim=0))  # one encoder, one batch of 2B
        b = frames.shape[0]
        fused = [block(x[:b], x[b:]) for block, x in zip(self.blocks, stages)]
        return self.head(fused)
