"""The network parts and losses of CMD (Huang et al., "Self-supervised Video Representation
Learning by Context and Motion Decoupling", CVPR 2021, arXiv 2104.00862; method card §8).

[CODE*] The authors' repository could not be found; every detail here was read in a public copy
of their code kept in TonyAlbertWan/CPaR (``pretrain.py``'s ``Net``, ``models/transformer.py``,
``models/resnet2d.py``), whose config was edited (C3D, 16 future frames); the defaults below are
the code's own defaults and comments, not checked against the paper's text.

- :class:`EmbeddingHead`: every branch ends in the same MLP, 1×1 Conv1d ``in → 2048`` (bias), BN,
  ReLU, 1×1 Conv1d ``2048 → 512`` (no bias), BN, then L2 normalisation. It maps rows [N, C]: one
  row per clip (context) or per position (motion).
- :class:`IFrameEncoder`: ResNet-10-2D (BasicBlocks [1, 1, 1, 1], 512-d, global average pool),
  timm's ResNet with those layers (timm's ``resnet10t`` has a deep stem: not the same network).
- :class:`MotionPredictor`: the clip tokens → Linear ``C → 512`` (no bias) → a post-norm
  transformer (2 encoder layers, 4 decoder layers, 8 heads, FFN 512, dropout 0.1) whose queries
  have zero content and a learned position each, one per position of the motion target map →
  :class:`EmbeddingHead` → one L2-normalised prediction per position.
- :func:`gathered_info_nce`: InfoNCE of local queries against the keys of every rank.
- :func:`motion_keys`: the motion targets in the order the point-wise InfoNCE expects.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock as BasicBlock2d
from timm.models.resnet import ResNet
from torch import Tensor, nn

from lightning_modules.distributed.comm import all_gather_with_grad, world_info

Grid = tuple[int, int, int]


class EmbeddingHead(nn.Sequential):
    """CMD's projection MLP on rows [N, ``in_features``] → L2-normalised [N, ``out_features``]
    (the code's ``iq_head``/``ik_head``/``mq_head``/``mk_head``). BatchNorm normalises over the N
    rows. Init as the code: conv weights Kaiming-normal (fan out), biases 0, BN scale 1, shift 0."""

    def __init__(self, in_features: int, hidden_features: int = 2048, out_features: int = 512) -> None:
        super().__init__(
            nn.Conv1d(in_features, hidden_features, 1),
            nn.BatchNorm1d(hidden_features),
            nn.ReLU(inplace=True),
            nn.Conv1d(hidden_features, out_features, 1, bias=False),
            nn.BatchNorm1d(out_features),
        )
        for module in self:
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, rows: Tensor) -> Tensor:
        return F.normalize(super().forward(rows[:, :, None])[:, :, 0], dim=1)


class IFrameEncoder(ResNet):
    """ResNet-10-2D on I-frames [B, 3, H, W] → [B, 512]: 7×7 stem of stride 2, max-pool, one
    BasicBlock per stage (64/128/256/512), global average pool; the last BN of each block starts
    at zero (the code's ``zero_init_residual=True``, timm's ``zero_init_last``). The code runs the
    same network as 1×k×k 3-D convs on a one-frame clip, which computes the same function."""

    def __init__(self) -> None:
        super().__init__(BasicBlock2d, [1, 1, 1, 1], num_classes=0, zero_init_last=True)


class _Attention(nn.Module):
    """Post-norm attention sub-layer: ``norm(x + dropout(attn(q, k, v)))``."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.attention(query, key, value, need_weights=False)[0]))


class _FeedForward(nn.Module):
    """Post-norm FFN sub-layer: ``norm(x + dropout(fc2(dropout(relu(fc1(x))))))``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout2(self.fc2(self.dropout1(F.relu(self.fc1(x))))))


class EncoderLayer(nn.Module):
    """Self-attention with the position added to queries and keys only (values are the content),
    then the FFN; DETR's post-norm layer as CMD's ``TransformerEncoderLayer``."""

    def __init__(self, dim: int, num_heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attention = _Attention(dim, num_heads, dropout)
        self.feedforward = _FeedForward(dim, feedforward, dropout)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        x = self.self_attention(x, x + pos, x + pos, x)
        return self.feedforward(x)


class DecoderLayer(nn.Module):
    """Self-attention among the queries (position on Q and K), cross-attention to the memory
    (Q = x + query position, K = memory + memory position, V = memory), then the FFN."""

    def __init__(self, dim: int, num_heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attention = _Attention(dim, num_heads, dropout)
        self.cross_attention = _Attention(dim, num_heads, dropout)
        self.feedforward = _FeedForward(dim, feedforward, dropout)

    def forward(self, x: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor) -> Tensor:
        x = self.self_attention(x, x + query_pos, x + query_pos, x)
        x = self.cross_attention(x, x + query_pos, memory + memory_pos, memory)
        return self.feedforward(x)


class GridEmbedding(nn.Embedding):
    """A learned position embedding, one row per cell of a ``grid`` (T, H, W) in row-major order,
    initialised uniform in [0, 1) as the code's ``nn.Embedding`` rows. :meth:`positions` returns
    the rows for a token grid: the table itself when the grid is the one it was made for, else
    the table trilinearly resized to that grid (clips of another geometry than the paper's, such
    as the 8-frame 64-pixel mini preset; an extension of this implementation, not in the code)."""

    def __init__(self, grid: Grid, dim: int) -> None:
        super().__init__(math.prod(grid), dim)
        self.grid = tuple(grid)
        nn.init.uniform_(self.weight)

    def positions(self, grid: Grid) -> Tensor:
        """[T·H·W, dim] position rows for a token grid (T, H, W)."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.weight
        table = self.weight.T.reshape(1, -1, *self.grid)
        return F.interpolate(table, size=grid, mode="trilinear", align_corners=False)[0].flatten(1).T


class MotionPredictor(nn.Module):
    """Predicts the motion embedding of every position of the future motion map from the clip
    tokens [B, C, T, H, W] (:func:`~lightning_modules.nn.video_resnet.cmd_tokens`).

    The tokens (row-major over T, H, W) go through Linear ``C → dim`` (no bias, N(0, 0.01)) and
    ``encoder_layers`` encoder layers with the learned source position on Q/K; the decoder starts
    from zero content at every target position (its learned query position on Q/K of the
    self-attention and on Q of the cross-attention, whose K is memory + source position), runs
    ``decoder_layers`` layers, and :class:`EmbeddingHead` maps each output to an L2-normalised
    embedding. ``source_grid``/``target_grid`` are the grids the position tables are made for:
    2×7×7 (98 tokens of a 16×112 clip) and 1×7×7 (49 positions of an 8×112 MV clip) in the code.

    Init as the code: the transformer's matrices Xavier-uniform, then every Linear (input
    projection, FFNs, attention output projections) N(0, 0.01) with zero bias, the position
    tables uniform in [0, 1).
    """

    def __init__(
        self,
        in_features: int,
        dim: int = 512,
        num_heads: int = 8,
        encoder_layers: int = 2,
        decoder_layers: int = 4,
        feedforward: int = 512,
        dropout: float = 0.1,
        source_grid: Grid = (2, 7, 7),
        target_grid: Grid = (1, 7, 7),
        head_hidden: int = 2048,
        out_features: int = 512,
    ) -> None:
        super().__init__()
        self.input_projection = nn.Linear(in_features, dim, bias=False)
        self.source_position = GridEmbedding(source_grid, dim)
        self.query_position = GridEmbedding(target_grid, dim)
        self.encoder = nn.ModuleList(EncoderLayer(dim, num_heads, feedforward, dropout) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(dim, num_heads, feedforward, dropout) for _ in range(decoder_layers))
        for layer in (*self.encoder, *self.decoder):
            for parameter in layer.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.head = EmbeddingHead(dim, head_hidden, out_features)

    def forward(self, tokens: Tensor, target_grid: Grid) -> Tensor:
        """[B, C, T, H, W] tokens → [B, P, out_features] predictions, P = the product of
        ``target_grid``, position p in row-major order of that grid."""
        batch = tokens.shape[0]
        memory = self.input_projection(tokens.flatten(2).transpose(1, 2))
        memory_pos = self.source_position.positions(tokens.shape[2:])[None]
        for layer in self.encoder:
            memory = layer(memory, memory_pos)
        query_pos = self.query_position.positions(target_grid)[None]
        x = memory.new_zeros(batch, query_pos.shape[1], memory.shape[2])
        for layer in self.decoder:
            x = layer(x, memory, query_pos, memory_pos)
        return self.head(x.flatten(0, 1)).view(batch, -1, self.head[-1].num_features)


def motion_keys(positive: Tensor, negative: Tensor) -> Tensor:
    """Motion target embeddings as the keys of the point-wise InfoNCE, [(1 + N)·B·P, D], from
    the positive [B, P, D] and negative [B, N, P, D] clips: first the B·P positives (row b·P + p,
    the order of the predictions, so that the positive of prediction i is key i), then the
    negatives clip slot by clip slot (the code's ``(j·B + b)·P + p``)."""
    return torch.cat([positive.flatten(0, 1), negative.transpose(0, 1).flatten(0, 2)])


def gathered_info_nce(
    queries: Tensor, keys: Tensor, temperature: float, key_gradient: Literal["exact", "authors"] = "exact"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """InfoNCE of this rank's ``queries`` [M, D] against the ``keys`` [K, D] of every rank
    (all-gathered in rank order, with gradient), the positive of query i being this rank's key i.

    Returns ``(loss, top-1 accuracy, logits, labels)``: logits ``queries · keys_allᵀ / τ`` of shape
    (M, K·world), labels ``arange(M) + rank·K``. The loss is the mean cross-entropy, in float32.
    CMD's L_ctx is this with the clip contexts as queries and the I-frame contexts as keys (M = K =
    B, the positive on the diagonal); L_mot with the B·P predictions as queries and
    :func:`motion_keys` as keys.

    ``key_gradient``: with ``exact`` the gathered keys carry gradient to the rank that computed
    them (the sum over ranks of the gradients, which DDP's averaging turns into the gradient of
    the mean loss over ranks); with ``authors`` that key gradient is divided once more by the
    world size, as the code's gather does [CODE*], which weights the key branch 1/world of the
    query branch on several GPUs (on one, both are the same).
    """
    if len(queries) > len(keys):
        raise ValueError(f"{len(queries)} queries need their positives among the {len(keys)} local keys")
    if key_gradient not in ("exact", "authors"):
        raise ValueError(f"key_gradient must be 'exact' or 'authors', got {key_gradient!r}")
    rank, world_size = world_info()
    if key_gradient == "authors" and world_size > 1:
        keys = keys / world_size + (keys - keys / world_size).detach()  # the same keys, 1/world of the gradient
    all_keys = all_gather_with_grad(keys.float())
    logits = queries.float() @ all_keys.T / temperature
    labels = torch.arange(len(queries), device=queries.device) + rank * len(keys)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, accuracy, logits, labels
