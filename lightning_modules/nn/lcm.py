"""LCM's additions to STM (Hu, Huang, Chen, Tai, Yao, Zhang, "Learning Position and Target
Consistency for Memory-based Video Object Segmentation", CVPR 2021; method card 2).

No authors' code is public. The module names and roles come from the paper's abstract and a
third-party reading note; the internal layouts below are the card's reconstruction [UNVERIFIED],
each size and constant a constructor argument:

- :class:`PositionGuidance` (PGM): local keys (3×3 conv of res4, ``key_dim`` 64) of the query
  and of the previous frame t−1 only, a fixed 2-D sine encoding (DETR's layout,
  :func:`sine_position_encoding`) times a learnable scale added to both, A = softmax over the
  previous frame's locations of ⟨k_{t−1}(i) + PE(i), k_q(j) + PE(j)⟩ / √d, and the previous
  frame's object mask (at res4) read through A: a one-channel location map (:func:`position_guided_read`).
- :class:`ObjectRelation` (ORM): the object's key and value vectors, mask-weighted averages of the
  first frame's memory keys and values under its ground-truth mask (ε in the mask sum); the
  relation map ⟨object key, query key(j)⟩ / √d_k; the output is the relation map and a 1×1
  projection of the object value, broadcast and gated by sigmoid(relation).
- :class:`LCMNetwork`: STM's network (global retrieval, card 1) whose decoder reads
  [memory read ‖ query value ‖ PGM map ‖ ORM maps]; each module can be switched off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.stm import FrameMemory, SpaceTimeMemory


def sine_position_encoding(channels: int, height: int, width: int, temperature: float = 100.0) -> Tensor:
    """A fixed 2-D sine/cosine encoding [channels, H, W] in DETR's layout (the first half encodes
    the row, the second the column; each half sin then cos of ``channels // 4`` frequencies
    ``temperature ** (-k / (channels // 4))``), on unnormalised cell positions, so that
    ⟨PE(i), PE(j)⟩ peaks at i = j and falls with the distance in cells."""
    if channels % 4:
        raise ValueError(f"a 2-D sine encoding needs channels divisible by 4; got {channels}")
    frequencies = temperature ** (-torch.arange(channels // 4, dtype=torch.float32) / (channels // 4))
    rows = torch.arange(height, dtype=torch.float32)[:, None] * frequencies  # [H, C/4]
    cols = torch.arange(width, dtype=torch.float32)[:, None] * frequencies  # [W, C/4]
    row_code = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, channels // 2)
    col_code = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, channels // 2)
    return torch.cat([row_code, col_code], dim=2).permute(2, 0, 1).contiguous()


def position_affinity(previous_keys: Tensor, query_keys: Tensor, encoding: Tensor) -> Tensor:
    """A [N, hw_prev, hw_query] = softmax over the previous frame's locations i of
    ⟨k_prev(i) + PE(i), k_q(j) + PE(j)⟩ / √d, keys [N, d, h, w], ``encoding`` [d, h, w] (scaled)."""
    d = query_keys.shape[1]
    previous = (previous_keys + encoding).flatten(2)  # [N, d, hw]
    query = (query_keys + encoding).flatten(2)
    return (torch.bmm(previous.transpose(1, 2), query) / math.sqrt(d)).softmax(dim=1)


def position_guided_read(previous_keys: Tensor, query_keys: Tensor, previous_masks: Tensor, encoding: Tensor) -> Tensor:
    """The location map [N, 1, h, w]: the previous frame's masks [N, 1, h, w] read through
    :func:`position_affinity`."""
    n, _, h, w = query_keys.shape
    weights = position_affinity(previous_keys, query_keys, encoding)
    return torch.bmm(previous_masks.flatten(2), weights).view(n, 1, h, w)


class PositionGuidance(nn.Module):
    """PGM (module docstring): ``memory_key`` makes the previous frame's local keys when it is
    memorised, ``forward`` reads its mask into the query's location map."""

    def __init__(self, in_channels: int, key_dim: int = 64, temperature: float = 100.0, initial_scale: float = 3.0) -> None:
        super().__init__()
        self.memory_key = nn.Conv2d(in_channels, key_dim, 3, padding=1)
        self.query_key = nn.Conv2d(in_channels, key_dim, 3, padding=1)
        self.temperature = temperature
        self.scale = nn.Parameter(torch.tensor(float(initial_scale)))

    def encoding(self, height: int, width: int, reference: Tensor) -> Tensor:
        code = sine_position_encoding(self.memory_key.out_channels, height, width, self.temperature)
        return self.scale * code.to(reference)

    def forward(self, query_r4: Tensor, previous: FrameMemory) -> Tensor:
        if previous.position_keys is None:
            raise ValueError("position guidance reads the previous frame's position keys; it was memorised without them")
        query_keys = self.query_key(query_r4)
        return position_guided_read(previous.position_keys, query_keys, previous.masks,
                                    self.encoding(*query_keys.shape[-2:], query_keys))


def masked_average(features: Tensor, masks: Tensor, eps: float = 1e-6) -> Tensor:
    """Mask-weighted average [N, C] of features [N, C, h, w] under masks [N, 1, h, w]; an empty
    mask gives zeros, not NaN."""
    return (features * masks).sum(dim=(2, 3)) / (masks.sum(dim=(2, 3)) + eps)


class ObjectRelation(nn.Module):
    """ORM (module docstring): the first frame's object vectors related to every query position;
    ``relation_dim + 1`` output channels."""

    def __init__(self, value_dim: int, relation_dim: int = 64) -> None:
        super().__init__()
        self.project = nn.Conv2d(value_dim, relation_dim, 1)

    def forward(self, query_keys: Tensor, first: FrameMemory) -> Tensor:
        object_key = masked_average(first.keys[:, :, 0], first.masks)  # [N, Dk]
        object_value = masked_average(first.values[:, :, 0], first.masks)  # [N, Dv]
        relation = torch.einsum("nc,nchw->nhw", object_key, query_keys)[:, None] / math.sqrt(query_keys.shape[1])
        value = self.project(object_value[:, :, None, None])  # [N, R, 1, 1]
        return torch.cat([relation, torch.sigmoid(relation) * value], dim=1)


class LCMNetwork(SpaceTimeMemory):
    """STM's network with PGM (frame t−1, the memory's last entry) and ORM (frame 0, its first
    entry, memorised with the ground truth) feeding the decoder (module docstring)."""

    def __init__(self, backbone: str = "resnet50", pretrained: bool = True, weights: str | None = None,
                 key_dim: int = 128, value_dim: int = 512, decoder_dim: int = 256, position_guidance: bool = True,
                 object_relation: bool = True, position_key_dim: int = 64, position_temperature: float = 100.0,
                 position_scale: float = 3.0, relation_dim: int = 64) -> None:
        guidance_channels = int(position_guidance) + (relation_dim + 1) * int(object_relation)
        super().__init__(backbone, pretrained, weights, key_dim, value_dim, decoder_dim, guidance_channels)
        r4 = self.query_encoder.channels[2]
        self.position_guidance = (PositionGuidance(r4, position_key_dim, position_temperature, position_scale)
                                  if position_guidance else None)
        self.object_relation = ObjectRelation(value_dim, relation_dim) if object_relation else None

    def position_keys(self, memory_r4: Tensor) -> Tensor | None:
        return None if self.position_guidance is None else self.position_guidance.memory_key(memory_r4)

    def guidance(self, query_r4: Tensor, query_keys: Tensor, query_values: Tensor,
                 memory: Sequence[FrameMemory]) -> list[Tensor]:
        maps = []
        if self.position_guidance is not None:
            maps.append(self.position_guidance(query_r4, memory[-1]))
        if self.object_relation is not None:
            maps.append(self.object_relation(query_keys, memory[0]))
        return maps
