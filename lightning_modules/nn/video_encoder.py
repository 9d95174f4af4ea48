"""Clip encoders of the video methods: a clip [B, 3, T, H, W] to a feature [B, D].

Either a video ResNet of :mod:`lightning_modules.nn.video_resnet` (``r2plus1d_26`` …) or any
2-D timm model (``resnet50`` …) applied to every frame, its features averaged over time (TSN's
average consensus, Wang et al., ECCV 2016), which is how a frame method such as SeCo is
evaluated on clips. Every video method keeps its encoder as ``self.backbone``, so the
evaluation protocols load ``backbone.*`` from any pretraining checkpoint.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_modules.nn.backbones import create_backbone
from lightning_modules.nn.video_resnet import VideoResNet


class VideoEncoder(nn.Module):
    """``name``: a video ResNet or any 2-D timm model, built by the one factory
    (:func:`~lightning_modules.nn.backbones.create_backbone`, which passes ``kwargs`` on: e.g.
    ``zero_init_residual`` for a video ResNet). ``pretrained``/``weights`` as there; the video
    ResNets have no pretrained weights to fetch, only a local ``weights`` file."""

    def __init__(self, name: str, pretrained: bool = False, weights: str | None = None, in_channels: int = 3,
                 **kwargs: Any) -> None:
        super().__init__()
        self.name = name
        self.network = create_backbone(name, pretrained, weights, num_classes=0, in_chans=in_channels, **kwargs)
        self.is_2d = not isinstance(self.network, VideoResNet)
        self.num_features: int = self.network.num_features

    def forward_frames(self, frames: Tensor) -> Tensor:
        """Features [B, D] of single frames [B, 3, H, W] (2-D models only)."""
        if not self.is_2d:
            raise ValueError(f"'{self.name}' is a video model; it encodes clips, not frames")
        return self.network(frames)

    def forward(self, clip: Tensor) -> Tensor:
        if not self.is_2d:
            return self.network(clip)
        batch, channels, time = clip.shape[:3]
        frames = clip.transpose(1, 2).reshape(batch * time, channels, *clip.shape[3:])
        return self.network(frames).view(batch, time, -1).mean(dim=1)
