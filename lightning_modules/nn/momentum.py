"""Momentum (EMA) encoders, as in MoCo (He et al., CVPR 2020) and the methods built on it
(SST's gallery, SeCo's key encoder, BYOL's target in CSTP)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def momentum_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_online, parameter by parameter (buffers untouched:
    the target's BatchNorm keeps its own running statistics, as in MoCo)."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)


def momentum_encoder_mode(network: nn.Module) -> None:
    """A momentum encoder's mode: BatchNorm layers in train mode (batch statistics, as MoCo's
    key encoder), everything else (dropout) in eval mode."""
    for module in network.modules():
        module.train(isinstance(module, nn.modules.batchnorm._BatchNorm))
