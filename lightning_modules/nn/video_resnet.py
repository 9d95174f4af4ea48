"""Video ResNets on [B, C, T, H, W] clips that timm lacks: R(2+1)D and plain 3-D ResNets, as
backbones of the UCF101 self-supervised methods (CSTP, CMD). Written from the papers'
descriptions, with the details the papers leave open taken from the methods' released code.

- (2+1)D conv (Tran et al., "A closer look at spatiotemporal convolutions for action
  recognition", CVPR 2018, §3.5): a t x d x d conv from N_in to N_out channels is factorised
  into a 1 x d x d spatial conv to M channels - BN - ReLU - a t x 1 x 1 temporal conv, with
  M = floor(t d^2 N_in N_out / (d^2 N_in + t N_out)) so the parameter count matches the 3-D conv.
  ``conv="3d"`` uses the plain 3 x 3 x 3 conv instead.
- Stem: (2+1)D 1x7x7 (spatial stride) to ``stem_mid_channels`` then 3x1x1 to 64 channels
  (45 as in torchvision's R(2+1)D; ``None`` takes M of the formula, 83, as CSTP's and CMD's code
  do); or a 3x7x7 conv for ``conv="3d"``. Optionally followed by a 1x3x3 max-pool of stride
  (1, 2, 2) (``stem_pool``, as in CMD's code).
- Four stages of basic (two convs) or bottleneck (1x1x1 - conv - 1x1x1, expansion 4) residual
  blocks of widths 64/128/256/512; the first block of each stage carries that stage's
  (temporal, spatial) stride, the shortcut is a strided 1x1x1 conv - BN where shapes change.

Strides (stem (t, h, w); stages (t, s) for layer1..4), T x H for a 16 x 112 x 112 clip:

- default, r2plus1d_10 (CSTP), r2plus1d_18 (Tran et al., 112-px clips, no max-pool): stem (1, 2, 2),
  stages (1, 1), (2, 2), (2, 2), (2, 2): 16x56 -> 16x56 -> 8x28 -> 4x14 -> 2x7.
- r2plus1d_26 (CMD): stem (1, 2, 2) + max-pool (1, 2, 2), same stages: 16x28 -> 16x28 -> 8x14 ->
  4x7 -> 2x4, so layer3 (1024, 4, 7, 7) and layer4 (2048, 2, 4, 4).
- r3d_10 (CMD's motion-vector encoder): stem (1, 1, 1) + max-pool (1, 2, 2), same stages; an
  8 x 112 x 112 motion-vector clip gives 8x56 -> 8x56 -> 4x28 -> 2x14 -> (512, 1, 7, 7).

The named models are in timm's registry (:mod:`lightning_modules.nn.registry`):
``timm.create_model("r2plus1d_26", in_chans=3, zero_init_residual=True)``; ``zero_init_residual``
starts every block as its shortcut (its last BatchNorm scale 0), as CMD's code builds them.

CMD's layouts are read from a public copy of its released code (TonyAlbertWan/CPaR keeps its
``models/`` and ``pretrain.py``), not checked against the authors' repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.registry import register_scratch_model

BlockType = Literal["basic", "bottleneck"]
ConvType = Literal["2plus1d", "3d"]
Stride = tuple[int, int]  # (temporal, spatial)

DEFAULT_LAYER_STRIDES: tuple[Stride, Stride, Stride, Stride] = ((1, 1), (2, 2), (2, 2), (2, 2))


def midplanes(in_channels: int, out_channels: int, t: int = 3, d: int = 3) -> int:
    """M of Tran et al. (CVPR 2018, §3.5): the width of a (2+1)D conv's intermediate space that
    gives it the parameter count of the t x d x d 3-D conv from ``in_channels`` to ``out_channels``."""
    return (t * d * d * in_channels * out_channels) // (d * d * in_channels + t * out_channels)


class Conv2Plus1d(nn.Sequential):
    """1 x d x d spatial conv (spatial stride) - BN - ReLU - t x 1 x 1 temporal conv (temporal stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: Stride = (1, 1), t: int = 3, d: int = 3) -> None:
        mid = midplanes(in_channels, out_channels, t, d)
        super().__init__(
            nn.Conv3d(in_channels, mid, (1, d, d), (1, stride[1], stride[1]), (0, d // 2, d // 2), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_channels, (t, 1, 1), (stride[0], 1, 1), (t // 2, 0, 0), bias=False),
        )


def conv3x3x3(conv: ConvType, in_channels: int, out_channels: int, stride: Stride = (1, 1)) -> nn.Module:
    """The 3 x 3 x 3 conv of a residual block: factorised (2+1)D or plain 3-D."""
    if conv == "2plus1d":
        return Conv2Plus1d(in_channels, out_channels, stride)
    if conv == "3d":
        return nn.Conv3d(in_channels, out_channels, 3, (stride[0], stride[1], stride[1]), 1, bias=False)
    raise ValueError(f"unknown conv '{conv}'; choose '2plus1d' or '3d'")


def _shortcut(in_channels: int, out_channels: int, stride: Stride) -> nn.Module:
    if stride == (1, 1) and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 1, (stride[0], stride[1], stride[1]), bias=False),
        nn.BatchNorm3d(out_channels),
    )


class BasicBlock(nn.Module):
    """conv - BN - ReLU - conv - BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: Stride, conv: ConvType) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            conv3x3x3(conv, in_channels, width, stride),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
            conv3x3x3(conv, width, width),
            nn.BatchNorm3d(width),
        )
        self.shortcut = _shortcut(in_channels, width, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1x1 - BN - ReLU - conv(stride) - BN - ReLU - 1x1x1 to 4 x width - BN, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: Stride, conv: ConvType) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.residual = nn.Sequential(
            nn.Conv3d(in_channels, width, 1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
            conv3x3x3(conv, width, width, stride),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
            nn.Conv3d(width, out_channels, 1, bias=False),
            nn.BatchNorm3d(out_channels),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class VideoResNet(nn.Module):
    """ResNet on [B, C, T, H, W] clips; ``forward`` gives the globally average-pooled
    [B, num_features] features, ``forward_features`` the layer4 map, ``forward_layers`` all four."""

    def __init__(
        self,
        block: BlockType = "basic",
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        conv: ConvType = "2plus1d",
        in_channels: int = 3,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        stem_stride: tuple[int, int, int] = (1, 2, 2),
        stem_mid_channels: int | None = 45,
        stem_pool: bool = False,
        layer_strides: Sequence[Stride] = DEFAULT_LAYER_STRIDES,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block '{block}'; choose one of {', '.join(BLOCKS)}")
        if len(layers) != 4 or len(widths) != 4 or len(layer_strides) != 4:
            raise ValueError("layers, widths and layer_strides need one entry per stage (4)")
        stem_width = 64
        if conv == "2plus1d":
            mid = midplanes(in_channels, stem_width, 3, 7) if stem_mid_channels is None else stem_mid_channels
            stem: list[nn.Module] = [
                nn.Conv3d(in_channels, mid, (1, 7, 7), (1, *stem_stride[1:]), (0, 3, 3), bias=False),
                nn.BatchNorm3d(mid),
                nn.ReLU(inplace=True),
                nn.Conv3d(mid, stem_width, (3, 1, 1), (stem_stride[0], 1, 1), (1, 0, 0), bias=False),
            ]
        elif conv == "3d":
            stem = [nn.Conv3d(in_channels, stem_width, (3, 7, 7), stem_stride, (1, 3, 3), bias=False)]
        else:
            raise ValueError(f"unknown conv '{conv}'; choose '2plus1d' or '3d'")
        stem += [nn.BatchNorm3d(stem_width), nn.ReLU(inplace=True)]
        if stem_pool:
            stem.append(nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        self.stem = nn.Sequential(*stem)

        block_type, channels = BLOCKS[block], stem_width
        stages = []
        for depth, width, stride in zip(layers, widths, layer_strides):
            blocks = []
            for i in range(depth):
                blocks.append(block_type(channels, width, tuple(stride) if i == 0 else (1, 1), conv))
                channels = width * block_type.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = channels
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:  # each block then starts as its shortcut (Goyal et al., 2017)
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.residual[-1].weight)

    def forward_layers(self, x: Tensor) -> list[Tensor]:
        """The outputs of layer1 ... layer4."""
        outputs, x = [], self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] clip -> [B, num_features, T', H', W'] layer4 map."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).mean(dim=(2, 3, 4))


def _video_resnet(num_classes: int, *args: Any, **kwargs: Any) -> VideoResNet:
    """timm's ``num_classes`` must be 0: the named video ResNets end in pooled features."""
    if num_classes:
        raise ValueError(f"the video ResNets have no classifier (num_classes 0), got num_classes={num_classes}")
    return VideoResNet(*args, **kwargs)


@register_scratch_model
def r2plus1d_10(in_chans: int = 3, num_classes: int = 0, **kwargs: Any) -> VideoResNet:
    """R(2+1)D-10, basic blocks (1, 1, 1, 1), 512-d: CSTP's backbone (Zhang et al., AAAI 2022,
    code ``models/pace/r21d_byol.py``). That code has no max-pool, stage strides 1/2/2/2 in time
    and space, and the stem's M from the formula (83); its downsampling shortcuts are (2+1)D
    1x1x1 convs, here a plain strided 1x1x1 conv."""
    return _video_resnet(num_classes, "basic", (1, 1, 1, 1), "2plus1d", in_chans, stem_mid_channels=None, **kwargs)


@register_scratch_model
def r2plus1d_test(in_chans: int = 3, num_classes: int = 0, **kwargs: Any) -> VideoResNet:
    """R(2+1)D-10's layout at an eighth of its widths (8 to 64 channels, 64-d), for CPU tests and
    the mini presets, in the spirit of timm's ``test_resnet``; not a model of any paper."""
    return _video_resnet(num_classes, "basic", (1, 1, 1, 1), "2plus1d", in_chans, widths=(8, 16, 32, 64),
                         stem_mid_channels=None, **kwargs)


@register_scratch_model
def r2plus1d_18(in_chans: int = 3, num_classes: int = 0, **kwargs: Any) -> VideoResNet:
    """R(2+1)D-18, basic blocks (2, 2, 2, 2), 512-d (Tran et al., CVPR 2018; torchvision's layout,
    33.2 M parameters: every (2+1)D conv takes M from its own channels, where torchvision reuses a
    block's first M for its second conv, 31.3 M)."""
    return _video_resnet(num_classes, "basic", (2, 2, 2, 2), "2plus1d", in_chans, **kwargs)


@register_scratch_model
def r2plus1d_26(in_chans: int = 3, num_classes: int = 0, **kwargs: Any) -> VideoResNet:
    """R(2+1)D-26, bottleneck blocks (2, 2, 2, 2), 2048-d: CMD's backbone (Huang et al., CVPR 2021).

    Layout as in CMD's released ``models/resnet2p1d.py`` (read in a public copy of that code,
    TonyAlbertWan/CPaR; not checked against the authors' repository): stem stride (1, 2, 2), the
    stem's M from the formula (83), 1x3x3 max-pool of stride (1, 2, 2), stage strides (t, s) =
    (1, 1), (2, 2), (2, 2), (2, 2). A 3 x 16 x 112 x 112 clip gives T x H: 16x56 -> pool 16x28 ->
    layer1 16x28 -> layer2 8x14 -> layer3 (1024, 4, 7, 7) -> layer4 (2048, 2, 4, 4).
    """
    kwargs = {"stem_mid_channels": None, "stem_pool": True, **kwargs}
    return _video_resnet(num_classes, "bottleneck", (2, 2, 2, 2), "2plus1d", in_chans, **kwargs)


@register_scratch_model
def r3d_10(in_chans: int = 2, num_classes: int = 0, stem_stride: tuple[int, int, int] = (1, 1, 1),
           **kwargs: Any) -> VideoResNet:
    """3-D ResNet-10, basic blocks (1, 1, 1, 1), 512-d: CMD's motion-vector target encoder
    (Huang et al., CVPR 2021: 2-channel (dx, dy) input, "first stride 1").

    As CMD's ``models/resnet3d.py`` called with ``first_stride=1``: 3x7x7 stem of stride (1, 1, 1),
    1x3x3 max-pool of stride (1, 2, 2), stage strides (1, 1), (2, 2), (2, 2), (2, 2). The MV clip of
    8 x 112 x 112 gives T x H: 8x112 -> pool 8x56 -> 8x56 -> 4x28 -> 2x14 -> (512, 1, 7, 7).
    """
    kwargs = {"stem_pool": True, **kwargs}
    return _video_resnet(num_classes, "basic", (1, 1, 1, 1), "3d", in_chans, stem_stride=stem_stride, **kwargs)


def cmd_tokens(model: VideoResNet, x: Tensor) -> Tensor:
    """CMD's clip tokens (Huang et al., CVPR 2021; ``Net._modified_backbone`` of its code).

    The layer3 map [B, C3, T3, H3, W3] is split into its even and odd time steps, concatenated on
    channels -> [B, 2 C3, T3 / 2, H3, W3]; the layer4 map, nearest-resized to that grid, is added.
    Needs 2 C3 = C4 (bottleneck and basic stages both double). For r2plus1d_26 on a
    3 x 16 x 112 x 112 clip: layer3 (1024, 4, 7, 7) -> (2048, 2, 7, 7); layer4 (2048, 2, 4, 4) ->
    (2048, 2, 7, 7); the sum [B, 2048, 2, 7, 7] is 98 tokens for CMD's transformer.
    """
    _, _, x3, x4 = model.forward_layers(x)
    if x3.shape[2] % 2 or 2 * x3.shape[1] != x4.shape[1]:
        raise ValueError(f"cmd_tokens needs an even layer3 time axis and C4 = 2 C3; got {x3.shape} and {x4.shape}")
    tokens = torch.cat([x3[:, :, 0::2], x3[:, :, 1::2]], dim=1)
    return tokens + F.interpolate(x4, size=tokens.shape[2:], mode="nearest")
