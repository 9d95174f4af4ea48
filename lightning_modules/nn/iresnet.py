"""iResNet: the "improved residual" (IR) face backbones of ArcFace (Deng et al., CVPR 2019, §3.3
and Fig. 7; insightface ``arcface_torch`` backbones), written from that description.

- Stem: conv3x3 (stride 1) - BN - PReLU on the 112x112 aligned face.
- Four stages of IR blocks with 64/128/256/512 channels, the first block of each stage with
  stride 2 (112 -> 56 -> 28 -> 14 -> 7). An IR block is BN - conv3x3 - BN - PReLU -
  conv3x3(stride) - BN, added to the (projected) input, with no activation after the sum.
- Embedding ("output layer E" of the ArcFace paper): BN2d - Dropout - FC(512*7*7 -> 512) - BN1d.
  insightface freezes the scale of that last BN at 1; so does this module.

Depths (blocks per stage): iresnet18 (2,2,2,2), 34 (3,4,6,3), 50 (3,4,14,3), 100 (3,13,30,3),
200 (6,26,60,6). Registered in timm's registry (:mod:`lightning_modules.nn.registry`):
``timm.create_model("iresnet50", num_classes=512, drop_rate=0.0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_modules.nn.registry import register_scratch_model

DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}

_BN_EPS = 1e-5


class IRBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (1x1-projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels, eps=_BN_EPS),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels, eps=_BN_EPS),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels, eps=_BN_EPS),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=_BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x) + self.shortcut(x)


class IResNet(nn.Module):
    """IR backbone mapping [B, 3, 112, 112] faces to [B, embedding_size] embeddings."""

    def __init__(
        self,
        depths: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0], eps=_BN_EPS),
            nn.PReLU(widths[0]),
        )
        blocks, in_channels = [], widths[0]
        for depth, width in zip(depths, widths):
            for i in range(depth):
                blocks.append(IRBlock(in_channels, width, stride=2 if i == 0 else 1))
                in_channels = width
        self.stages = nn.Sequential(*blocks)
        spatial = input_size // 2 ** len(depths)
        self.embedding = nn.Sequential(
            nn.BatchNorm2d(in_channels, eps=_BN_EPS),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(in_channels * spatial * spatial, embedding_size),
            nn.BatchNorm1d(embedding_size, eps=_BN_EPS),
        )
        self.embedding[-1].weight.requires_grad_(False)  # scale fixed at 1 (insightface)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(self.stages(self.stem(x)))


def _iresnet(name: str, num_classes: int, drop_rate: float, **kwargs: Any) -> IResNet:
    """timm's arguments: ``num_classes`` is the embedding size, ``drop_rate`` the dropout."""
    return IResNet(DEPTHS[name], embedding_size=num_classes, dropout=drop_rate, **kwargs)


@register_scratch_model
def iresnet18(num_classes: int = 512, drop_rate: float = 0.0, **kwargs: Any) -> IResNet:
    return _iresnet("iresnet18", num_classes, drop_rate, **kwargs)


@register_scratch_model
def iresnet34(num_classes: int = 512, drop_rate: float = 0.0, **kwargs: Any) -> IResNet:
    return _iresnet("iresnet34", num_classes, drop_rate, **kwargs)


@register_scratch_model
def iresnet50(num_classes: int = 512, drop_rate: float = 0.0, **kwargs: Any) -> IResNet:
    return _iresnet("iresnet50", num_classes, drop_rate, **kwargs)


@register_scratch_model
def iresnet100(num_classes: int = 512, drop_rate: float = 0.0, **kwargs: Any) -> IResNet:
    return _iresnet("iresnet100", num_classes, drop_rate, **kwargs)


@register_scratch_model
def iresnet200(num_classes: int = 512, drop_rate: float = 0.0, **kwargs: Any) -> IResNet:
    return _iresnet("iresnet200", num_classes, drop_rate, **kwargs)
