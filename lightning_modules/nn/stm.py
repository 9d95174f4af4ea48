"""Space-Time Memory network parts (Oh, Lee, Xu, Kim, "Video Object Segmentation using Space-Time
Memory Networks", ICCV 2019; seoungwugoh/STM ``model.py``; method card 1).

- :class:`MemoryEncoder` / :class:`QueryEncoder`: a timm ResNet up to res4 (``layer3``); the
  memory encoder adds the object's mask and the other objects' mask, each through its own 7×7/2
  convolution, to the RGB stem's output before its BatchNorm.
- :class:`KeyValue`: 3×3 convolutions to keys (128) and values (512) of res4.
- :func:`memory_read`: p = softmax over the memory locations (T·h·w) of ⟨k_M, k_Q⟩ / √d_k; the
  read values Σ p v_M concatenated with the query's values.
- :class:`Decoder`: res4 read → 256 channels, refined with res3 and res2, 2-class logits at 1/4,
  upsampled ×4.
- :class:`FrameMemory`: one memorised frame (keys, values, the objects' masks at res4), the
  memory a list of them: frame 0 first, frame t−1 last (LCM reads those two on their own).
- :func:`soft_aggregation`: per-object foreground probabilities → logits over {background,
  objects} (background = Π(1 - p_o), clamped, log-odds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.backbones import create_backbone

STRIDE = 16  # res4's stride: frames are padded to a multiple of it


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.downsample = nn.Conv2d(in_channels, out_channels, 3, padding=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        r = self.conv2(F.relu(self.conv1(F.relu(x))))
        return (x if self.downsample is None else self.downsample(x)) + r


class Refine(nn.Module):
    """A skip feature (conv + ResBlock) plus the ×2-upsampled coarse path, then a ResBlock."""

    def __init__(self, skip_channels: int, channels: int) -> None:
        super().__init__()
        self.conv_skip = nn.Conv2d(skip_channels, channels, 3, padding=1)
        self.res_skip = ResBlock(channels, channels)
        self.res_merged = ResBlock(channels, channels)

    def forward(self, skip: Tensor, coarse: Tensor) -> Tensor:
        s = self.res_skip(self.conv_skip(skip))
        return self.res_merged(s + F.interpolate(coarse, size=s.shape[-2:], mode="bilinear", align_corners=False))


class Decoder(nn.Module):
    def __init__(self, read_channels: int, r3_channels: int, r2_channels: int, channels: int = 256) -> None:
        super().__init__()
        self.conv_read = nn.Conv2d(read_channels, channels, 3, padding=1)
        self.res_read = ResBlock(channels, channels)
        self.refine3 = Refine(r3_channels, channels)
        self.refine2 = Refine(r2_channels, channels)
        self.predict = nn.Conv2d(channels, 2, 3, padding=1)

    def forward(self, read: Tensor, r3: Tensor, r2: Tensor) -> Tensor:
        m = self.refine2(r2, self.refine3(r3, self.res_read(self.conv_read(read))))
        return F.interpolate(self.predict(F.relu(m)), scale_factor=4, mode="bilinear", align_corners=False)


class KeyValue(nn.Module):
    def __init__(self, in_channels: int, key_dim: int, value_dim: int) -> None:
        super().__init__()
        self.key = nn.Conv2d(in_channels, key_dim, 3, padding=1)
        self.value = nn.Conv2d(in_channels, value_dim, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.key(x), self.value(x)


def memory_read(memory_keys: Tensor, memory_values: Tensor, query_keys: Tensor, query_values: Tensor) -> Tensor:
    """Keys [B, Dk, T, h, w] and values [B, Dv, T, h, w] of the memory read by the query's keys
    [B, Dk, h, w]: the softmax is over the T·h·w memory locations; returns [B, 2 Dv, h, w]
    (the read values, then the query's values)."""
    b, dk, t, h, w = memory_keys.shape
    affinity = torch.bmm(memory_keys.reshape(b, dk, t * h * w).transpose(1, 2), query_keys.reshape(b, dk, h * w))
    weights = (affinity / math.sqrt(dk)).softmax(dim=1)  # [B, THW, hw]: each query location's weights sum to 1
    read = torch.bmm(memory_values.reshape(b, memory_values.shape[1], t * h * w), weights).view(b, -1, h, w)
    return torch.cat([read, query_values], dim=1)


def soft_aggregation(probabilities: Tensor) -> Tensor:
    """Foreground probabilities [O, H, W] of O objects → logits [O + 1, H, W] (background first)."""
    background = torch.prod(1 - probabilities, dim=0, keepdim=True)
    p = torch.cat([background, probabilities], dim=0).clamp(1e-7, 1 - 1e-7)
    return torch.log(p / (1 - p))


class _ResNetToRes4(nn.Module):
    """A timm ResNet's stem and ``layer1``-``layer3`` (res2, res3, res4)."""

    def __init__(self, backbone: str, pretrained: bool, weights: str | None) -> None:
        super().__init__()
        network = create_backbone(backbone, pretrained, weights)
        for name in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"):
            if not hasattr(network, name):
                raise ValueError(f"STM's encoders are ResNets (conv1, bn1, act1, maxpool, layer1-3); '{backbone}' has no {name}")
            setattr(self, name, getattr(network, name))
        self.channels = tuple(info["num_chs"] for info in network.feature_info[1:4])  # res2, res3, res4

    def layers(self, stem: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(res4, res3, res2) from the stem's convolution output (before bn1)."""
        r2 = self.layer1(self.maxpool(self.act1(self.bn1(stem))))
        r3 = self.layer2(r2)
        return self.layer3(r3), r3, r2


class QueryEncoder(_ResNetToRes4):
    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.layers(self.conv1(frames))


class MemoryEncoder(_ResNetToRes4):
    def __init__(self, backbone: str, pretrained: bool, weights: str | None) -> None:
        super().__init__(backbone, pretrained, weights)
        stem_channels = self.bn1.num_features
        self.conv_mask = nn.Conv2d(1, stem_channels, 7, stride=2, padding=3, bias=False)
        self.conv_other = nn.Conv2d(1, stem_channels, 7, stride=2, padding=3, bias=False)

    def forward(self, frames: Tensor, masks: Tensor, others: Tensor) -> Tensor:
        stem = self.conv1(frames) + self.conv_mask(masks[:, None]) + self.conv_other(others[:, None])
        return self.layers(stem)[0]


@dataclass
class FrameMemory:
    """One memorised frame of N objects (batch entries): ``keys`` [N, Dk, 1, h, w], ``values``
    [N, Dv, 1, h, w], the objects' soft ``masks`` at res4 [N, 1, h, w] (area-averaged), and
    ``position_keys`` [N, Dp, h, w] where the network has position guidance (LCM), else None."""

    keys: Tensor
    values: Tensor
    masks: Tensor
    position_keys: Optional[Tensor] = None


class SpaceTimeMemory(nn.Module):
    """STM's network: ``memorize`` a frame with an object's mask into a :class:`FrameMemory`,
    ``segment`` a frame from a memory (frame 0 first, the previous frame last) into the object's
    foreground probability. Objects are batch entries. Subclasses add inputs to the decoder
    through :meth:`guidance` (LCM)."""

    def __init__(self, backbone: str = "resnet50", pretrained: bool = True, weights: str | None = None,
                 key_dim: int = 128, value_dim: int = 512, decoder_dim: int = 256, guidance_channels: int = 0) -> None:
        super().__init__()
        self.memory_encoder = MemoryEncoder(backbone, pretrained, weights)
        self.query_encoder = QueryEncoder(backbone, pretrained, weights)
        r2, r3, r4 = self.query_encoder.channels
        self.memory_key_value = KeyValue(r4, key_dim, value_dim)
        self.query_key_value = KeyValue(r4, key_dim, value_dim)
        self.decoder = Decoder(2 * value_dim + guidance_channels, r3, r2, decoder_dim)

    def memorize(self, frames: Tensor, masks: Tensor, others: Tensor) -> FrameMemory:
        """The memory of frames [N, 3, H, W] with each object's (soft) mask [N, H, W] and the other
        objects' [N, H, W]."""
        r4 = self.memory_encoder(frames, masks, others)
        keys, values = self.memory_key_value(r4)
        small_masks = F.adaptive_avg_pool2d(masks[:, None], r4.shape[-2:])
        return FrameMemory(keys[:, :, None], values[:, :, None], small_masks, self.position_keys(r4))

    def position_keys(self, memory_r4: Tensor) -> Optional[Tensor]:
        """A memorised frame's keys for :meth:`guidance` (none in STM)."""
        return None

    def guidance(self, query_r4: Tensor, query_keys: Tensor, query_values: Tensor,
                 memory: Sequence[FrameMemory]) -> list[Tensor]:
        """Maps [N, C, h, w] concatenated to the memory read before the decoder (none in STM)."""
        return []

    def segment(self, frames: Tensor, memory: Sequence[FrameMemory]) -> Tensor:
        """Foreground probability [N, H, W] of each object's frame [N, 3, H, W] read from its
        memory. Frames of objects of one frame may be given once ([1, 3, H, W])."""
        r4, r3, r2 = self.query_encoder(frames)
        query_keys, query_values = self.query_key_value(r4)
        n = memory[0].keys.shape[0]
        if frames.shape[0] != n:  # one frame, several objects
            r4, r3, r2, query_keys, query_values = (x.expand(n, *x.shape[1:]) for x in (r4, r3, r2, query_keys, query_values))
        keys, values = torch.cat([m.keys for m in memory], dim=2), torch.cat([m.values for m in memory], dim=2)
        read = memory_read(keys, values, query_keys, query_values)
        logits = self.decoder(torch.cat([read, *self.guidance(r4, query_keys, query_values, memory)], dim=1), r3, r2)
        return logits.softmax(dim=1)[:, 1]


def pad_to_stride(x: Tensor, stride: int = STRIDE) -> tuple[Tensor, tuple[int, int, int, int]]:
    """``x`` [..., H, W] zero-padded to multiples of ``stride``, the padding split evenly between
    the sides as STM's ``pad_divide_by``; returns it and the (left, right, top, bottom) padding
    that :func:`unpad` removes."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % stride, (-w) % stride
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return F.pad(x, padding), padding


def unpad(x: Tensor, padding: tuple[int, int, int, int]) -> Tensor:
    left, right, top, bottom = padding
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]
