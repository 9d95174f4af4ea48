"""Clip encoders of the video methods: a clip [B, 3, T, H, W] to a feature [B, D].

Either a video ResNet of :mod:`lightning_modules.nn.video_resnet` (``r2plus1d_26`` …) or any
2-D timm model (``resnet50`` …) applied to every frame, its features averaged over time (TSN's
average consensus, Wang et al., ECCV 2016), which is how a frame method such as SeCo is
evaluated on clips. Every video method keeps its encoder as ``self.backbone``, so the
evaluation protocols load ``backbone.*`` from any pretraining checkpoint.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_modules.nn.backbones import create_backbone
from lightning_modules.nn.video_resnet import VIDEO_BACKBONES, create_video_backbone


class VideoEncoder(nn.Module):
    """``name``: a video ResNet name or a timm model name; ``pretrained``/``weights`` only for
    timm models (the video ResNets are trained from scratch here)."""

    def __init__(self, name: str, pretrained: bool = False, weights: str | None = None, in_channels: int = 3) -> None:
        super().__init__()
        self.name = name
        self.is_2d = name not in VIDEO_BACKBONES
        if self.is_2d:
            self.network = create_backbone(name, pretrained, weights, num_classes=0, in_chans=in_channels)
        else:
            if pretrained or weights:
                raise ValueError(f"'{name}' is trained from scratch here; set pretrained false and weights null")
            self.network = create_video_backbone(name, in_channels)
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
