"""MoCo's shuffle-BN (He et al., CVPR 2020): a key encoder whose BatchNorm statistics mix
samples of other ranks, so that they cannot leak which key matches which query."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.distributed.comm import all_gather, world_info


@torch.no_grad()
def shuffled_batchnorm_forward(network: nn.Module, inputs: Tensor, generator: torch.Generator) -> Tensor:
    """``network(inputs)`` with the global batch permuted across ranks before the forward and
    restored after. ``generator`` must draw the same permutation on every rank."""
    rank, world_size = world_info()
    if world_size == 1:
        return network(inputs)
    batch = inputs.shape[0]
    permutation = torch.randperm(batch * world_size, generator=generator).to(inputs.device)
    mine = permutation[rank * batch : (rank + 1) * batch]
    outputs = all_gather(network(all_gather(inputs)[mine]))
    restored = torch.empty_like(outputs)
    restored[permutation] = outputs
    return restored[rank * batch : (rank + 1) * batch]
