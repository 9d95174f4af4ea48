"""Weight initialisations that a method's authors use instead of PyTorch's defaults."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def glorot_uniform_(module: nn.Module) -> nn.Module:
    """CSTP's initialisation (Katou2/CSTP ``models/pace/r21d_byol.py``, ``_glorot_uniform``):
    the weight of every ``Linear``, ``Conv3d``, ``BatchNorm1d`` and ``BatchNorm3d`` of ``module``
    drawn from U(−b, b), b = √(6 / (fan_in + fan_out)). A convolution's fans count its receptive
    field; a 1-D weight (BatchNorm's γ, which may then start negative) has fan_in = fan_out =
    n / 2. Biases keep their initialisation. Returns ``module``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm3d)) and layer.weight is not None:
            weight = layer.weight
            if weight.dim() < 2:
                fan_in = fan_out = weight.shape[0] // 2
            else:
                receptive_field = weight[0][0].numel()
                fan_in, fan_out = weight.shape[1] * receptive_field, weight.shape[0] * receptive_field
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            weight.uniform_(-bound, bound)
    return module
