"""Invertible building blocks of MSFlow (Zhou et al., "MSFlow: Multi-Scale Flow-based
Framework for Unsupervised Anomaly Detection", TNNLS 2024, arXiv 2308.15300).

Plain torch, written from the method card (authors' code cool-xuan/msflow @e2397559 and
the FrEIA ``AllInOneBlock`` semantics it relies on). Every block maps ``x -> (y, log|det J|)``
with the log-determinant per sample, and has an exact ``inverse``.

- :class:`AllInOneBlock`: affine coupling conditioned on a positional encoding, then a
  learned global affine ("ActNorm", softplus-parametrised, initialised to the identity) and
  a fixed random channel permutation.
- :class:`ParallelFlow`: the per-scale stack of coupling blocks (2, 5 and 8 blocks for the
  three scales in the paper).
- :class:`FusionFlow`: a fixed permutation per scale, then one :class:`FusionCouplingLayer`
  that couples all scales through a shared subnet at the coarsest resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """Fixed 2-D sinusoidal encoding [channels, height, width] with values in [-1, 1].

    Half of the channels encode the column (x) and half the row (y), each as interleaved
    sin/cos at geometrically spaced frequencies (Transformer encoding; as in CFlow/MSFlow).
    """
    if channels % 4:
        raise ValueError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * (-math.log(10000.0) / half))
    x = torch.arange(width, dtype=torch.float32)[:, None] * frequencies  # [W, half/2]
    y = torch.arange(height, dtype=torch.float32)[:, None] * frequencies  # [H, half/2]
    encoding = torch.empty(channels, height, width)
    encoding[0:half:2] = x.sin().T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = x.cos().T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = y.sin().T[:, :, None].expand(-1, -1, width)
    encoding[half + 1 :: 2] = y.cos().T[:, :, None].expand(-1, -1, width)
    return encoding


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension of a [B, C, H, W] map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_ln_subnet(in_channels: int, out_channels: int) -> nn.Module:
    """MSFlow's coupling subnet: conv3x3 (c_in -> c_in), channel LayerNorm, ReLU, conv3x3."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1),
        ChannelLayerNorm(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
    )


def _channel_split(channels: int) -> tuple[int, int]:
    """FrEIA's split: the first (passive) part takes the extra channel when odd."""
    return channels - channels // 2, channels // 2


class AllInOneBlock(nn.Module):
    """Conditional affine coupling + global affine + fixed permutation (FrEIA ``AllInOneBlock``
    with ``global_affine_type='SOFTPLUS'``, ``global_affine_init=1``, hard permutation).

    Coupling: the passive half x1 (with the condition) predicts ``a = 0.1 * subnet([x1, c])``;
    the active half becomes ``x2 * exp(s) + t`` with ``s = clamp * tanh(a_s / clamp)``.
    Global affine: ``y * 0.1 * softplus_{beta=0.5}(g) + b``, with g initialised so the scale is 1.
    """

    def __init__(
        self,
        channels: int,
        condition_channels: int,
        clamp: float = 1.9,
        subnet_constructor: Callable[[int, int], nn.Module] = conv_ln_subnet,
    ) -> None:
        super().__init__()
        self.passive_channels, self.active_channels = _channel_split(channels)
        self.clamp = clamp
        self.subnet = subnet_constructor(self.passive_channels + condition_channels, 2 * self.active_channels)
        # 0.1 * softplus_{0.5}(g) == 1  <=>  g = 2 * ln(e^5 - 1)
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), 2.0 * math.log(math.exp(5.0) - 1.0)))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        permutation = torch.randperm(channels)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def _scale(self) -> Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coupling_parameters(self, passive: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        a = 0.1 * self.subnet(torch.cat([passive, condition], dim=1))
        log_scale = self.clamp * torch.tanh(a[:, : self.active_channels] / self.clamp)
        return log_scale, a[:, self.active_channels :]

    def forward(self, x: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        passive, active = x.split([self.passive_channels, self.active_channels], dim=1)
        log_scale, shift = self._coupling_parameters(passive, condition)
        y = torch.cat([passive, active * log_scale.exp() + shift], dim=1)
        scale = self._scale()
        y = (y * scale + self.global_offset)[:, self.permutation]
        pixels = x.shape[2] * x.shape[3]
        log_det = log_scale.sum(dim=(1, 2, 3)) + pixels * scale.log().sum()
        return y, log_det

    def inverse(self, y: Tensor, condition: Tensor) -> Tensor:
        y = (y[:, self.inverse_permutation] - self.global_offset) / self._scale()
        passive, active = y.split([self.passive_channels, self.active_channels], dim=1)
        log_scale, shift = self._coupling_parameters(passive, condition)
        return torch.cat([passive, (active - shift) * (-log_scale).exp()], dim=1)


class ParallelFlow(nn.Module):
    """The flow of one scale: ``num_blocks`` :class:`AllInOneBlock` s, all conditioned on the
    same fixed positional encoding of the map's size."""

    def __init__(self, channels: int, num_blocks: int, condition_channels: int = 64, clamp: float = 1.9) -> None:
        super().__init__()
        self.condition_channels = condition_channels
        self.blocks = nn.ModuleList(AllInOneBlock(channels, condition_channels, clamp) for _ in range(num_blocks))

    def condition(self, x: Tensor) -> Tensor:
        encoding = positional_encoding_2d(self.condition_channels, x.shape[2], x.shape[3])
        return encoding.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        condition = self.condition(x)
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, block_log_det = block(x, condition)
            log_det = log_det + block_log_det
        return x, log_det

    def inverse(self, z: Tensor) -> Tensor:
        condition = self.condition(z)
        for block in reversed(self.blocks):
            z = block.inverse(z, condition)
        return z


def soft_clamp_log_scale(s: Tensor, clamp: float) -> Tensor:
    """log e(s) of the fusion coupling: ``clamp * 0.636 * atan(s / clamp)`` (0.636 ~ 2/pi)."""
    return clamp * 0.636 * torch.atan(s / clamp)


class _CrossScaleSubnet(nn.Module):
    """Predicts per-scale (log-scale, shift) for one half of every scale from the other half.

    The conditioning halves of all scales are average-pooled to the coarsest size,
    concatenated, mixed by conv3x3 - LN - ReLU - conv3x3 - ReLU, split back per scale,
    upsampled to each scale's size and added to the input (residual); per-scale conv3x3s
    then give s_i and t_i.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], hidden_channels: int) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        total = sum(in_channels)
        self.mix = nn.Sequential(
            nn.Conv2d(total, hidden_channels, 3, padding=1),
            ChannelLayerNorm(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, total, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.to_log_scale = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(in_channels, out_channels))
        self.to_shift = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(in_channels, out_channels))

    def forward(self, halves: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        coarsest = min((h.shape[2], h.shape[3]) for h in halves)
        pooled = torch.cat([F.adaptive_avg_pool2d(h, coarsest) for h in halves], dim=1)
        mixed = self.mix(pooled).split(self.in_channels, dim=1)
        outputs = []
        for i, (half, context) in enumerate(zip(halves, mixed)):
            hidden = half + F.interpolate(context, size=half.shape[2:], mode="bilinear", align_corners=False)
            outputs.append((self.to_log_scale[i](hidden), self.to_shift[i](hidden)))
        return outputs


class FusionCouplingLayer(nn.Module):
    """MSFlow's fusion coupling: each scale is split into (a_i, b_i); a subnet on all {b_i}
    updates every a_i (``a_i * e(s_i) + t_i``), then a second subnet on all updated {a_i}
    updates every b_i. ``log|det J| = sum of log e(s)`` over both steps."""

    def __init__(self, channels: Sequence[int], clamp: float = 1.9) -> None:
        super().__init__()
        self.clamp = clamp
        splits = [_channel_split(c) for c in channels]
        self.a_channels = [a for a, _ in splits]
        self.b_channels = [b for _, b in splits]
        hidden = max(1, sum(channels) // 8)
        self.update_a = _CrossScaleSubnet(self.b_channels, self.a_channels, hidden)
        self.update_b = _CrossScaleSubnet(self.a_channels, self.b_channels, hidden)

    def _split(self, xs: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        halves = [x.split([a, b], dim=1) for x, a, b in zip(xs, self.a_channels, self.b_channels)]
        return [a for a, _ in halves], [b for _, b in halves]

    def _affine(self, targets: list[Tensor], conditions: list[Tensor], subnet: nn.Module, reverse: bool) -> tuple[list[Tensor], Tensor]:
        log_det = targets[0].new_zeros(targets[0].shape[0])
        outputs = []
        for target, (s, t) in zip(targets, subnet(conditions)):
            log_scale = soft_clamp_log_scale(s, self.clamp)
            if reverse:
                outputs.append((target - t) * (-log_scale).exp())
            else:
                outputs.append(target * log_scale.exp() + t)
            log_det = log_det + log_scale.sum(dim=(1, 2, 3))
        return outputs, log_det

    def forward(self, xs: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        a, b = self._split(xs)
        a, log_det_a = self._affine(a, b, self.update_a, reverse=False)
        b, log_det_b = self._affine(b, a, self.update_b, reverse=False)
        return [torch.cat(pair, dim=1) for pair in zip(a, b)], log_det_a + log_det_b

    def inverse(self, zs: Sequence[Tensor]) -> list[Tensor]:
        a, b = self._split(zs)
        b, _ = self._affine(b, a, self.update_b, reverse=True)
        a, _ = self._affine(a, b, self.update_a, reverse=True)
        return [torch.cat(pair, dim=1) for pair in zip(a, b)]


class FusionFlow(nn.Module):
    """A fixed random channel permutation per scale, then one :class:`FusionCouplingLayer`."""

    def __init__(self, channels: Sequence[int], clamp: float = 1.9) -> None:
        super().__init__()
        for i, c in enumerate(channels):
            permutation = torch.randperm(c)
            self.register_buffer(f"permutation_{i}", permutation)
            self.register_buffer(f"inverse_permutation_{i}", torch.argsort(permutation))
        self.num_scales = len(channels)
        self.coupling = FusionCouplingLayer(channels, clamp)

    def _permute(self, xs: Sequence[Tensor], name: str) -> list[Tensor]:
        return [x[:, getattr(self, f"{name}_{i}")] for i, x in enumerate(xs)]

    def forward(self, xs: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        return self.coupling(self._permute(xs, "permutation"))

    def inverse(self, zs: Sequence[Tensor]) -> list[Tensor]:
        return self._permute(self.coupling.inverse(zs), "inverse_permutation")
