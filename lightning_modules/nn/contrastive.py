"""Contrastive-learning parts of the MoCo family (He et al., CVPR 2020; Chen et al., MoCo v2,
arXiv 2003.04297), shared by the video methods (SeCo; CMD and CSTP may use them too).

- :class:`ProjectionHead`: MoCo v2's projection, Linear(D, D) → ReLU → Linear(D, 128) (or one
  Linear without ``mlp``, MoCo v1), its output L2-normalised.
- :class:`FeatureQueue`: the queue of K negative keys [K, D] with a write pointer; a batch of N
  keys is written at the pointer and the pointer moves on by N modulo K, for any N and K.
- :func:`info_nce_logits` / :func:`info_nce_loss`: InfoNCE against a queue, logits
  ``[q·k⁺, q·n_1, …, q·n_K] / τ`` of shape (N, 1 + K), the positive in column 0.
- :func:`two_way_logits`: a positive against one negative per row, (J·N, 2); SeCo's intra-frame
  loss.

Plain torch, no Lightning. Every loss here is computed in float32, also under bf16 autocast: at
τ = 0.1 a bf16 dot product's rounding (≈ 4e-3) would move a logit by ≈ 0.04.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``in_features`` → ``out_features``, L2-normalised: Linear–ReLU–Linear with a hidden width
    of ``hidden_features`` (default ``in_features``, MoCo v2's ``--mlp``; SeCo's ``--model_mlp``),
    or a single Linear with ``mlp=False``. ``normalize=False`` returns the raw projection."""

    def __init__(
        self, in_features: int, out_features: int = 128, mlp: bool = True, hidden_features: int | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        hidden = hidden_features or in_features
        layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features)] if mlp \
            else [nn.Linear(in_features, out_features)]
        # nn.Sequential layout of MoCo's `fc` (fc.0, fc.2), so that MoCo checkpoints load by name.
        self.fc = nn.Sequential(*layers)
        self.normalize = normalize
        self.out_features = out_features

    def forward(self, features: Tensor) -> Tensor:
        projection = self.fc(features)
        return F.normalize(projection, dim=1) if self.normalize else projection


class FeatureQueue(nn.Module):
    """A FIFO memory of ``size`` keys of dimension ``dim`` (buffers ``queue`` [K, D] and
    ``pointer``, so both are checkpointed).

    The start is SeCo's ``MemorySeCo`` (and CMC's): uniform in ±1/√(D/3), random vectors of
    about unit norm. :meth:`enqueue` writes N keys at slots ``pointer, pointer + 1, …`` modulo K
    and moves the pointer to ``(pointer + N) mod K``; with N > K only the last K keys stay, as
    writing them one after the other would leave. Under DDP, give it the keys of every rank
    (gathered in rank order) on every rank, so that all ranks hold the same queue.
    """

    queue: Tensor
    pointer: Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be positive, got {size} x {dim}")
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("queue", torch.rand(size, dim, generator=generator) * (2 * bound) - bound)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def negatives(self) -> Tensor:
        """A detached copy of the queue [K, D]: a forward that uses it may be followed by
        :meth:`enqueue` before its backward without touching what autograd saved."""
        return self.queue.detach().clone()

    def slots(self, count: int) -> Tensor:
        """The queue rows the next ``count`` keys go to (for ``count`` ≤ K)."""
        return (self.pointer + torch.arange(count, device=self.queue.device)) % self.size

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` [N, D] (no gradient) at the pointer, wrapping around the end."""
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must be [N, {self.queue.shape[1]}], got {list(keys.shape)}")
        count = keys.shape[0]
        if count == 0:
            return
        kept = keys[-self.size :] if count > self.size else keys
        slots = (self.pointer + (count - kept.shape[0]) + torch.arange(kept.shape[0], device=self.queue.device)) % self.size
        self.queue.index_copy_(0, slots, kept.detach().to(self.queue.dtype))
        self.pointer.copy_((self.pointer + count) % self.size)


def _float32(*tensors: Tensor) -> list[Tensor]:
    return [t.float() for t in tensors]


def info_nce_logits(query: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Logits (N, 1 + K) of InfoNCE: row i is ``[q_i·k_i, q_i·n_1, …, q_i·n_K] / τ`` for
    queries ``query`` [N, D], their positive keys ``positive`` [N, D] (detached) and the
    negatives ``negatives`` [K, D] (a queue, detached). The positive is column 0."""
    with torch.autocast(query.device.type, enabled=False):
        query, positive, negatives = _float32(query, positive.detach(), negatives.detach())
        positive_logit = (query * positive).sum(dim=1, keepdim=True)
        return torch.cat([positive_logit, query @ negatives.T], dim=1) / temperature


def two_way_logits(query: Tensor, positive: Tensor, negatives: Sequence[Tensor], temperature: float) -> Tensor:
    """Logits (J·N, 2) for J negative sets: rows j·N + i are ``[q_i·k⁺_i, q_i·k^j_i] / τ``,
    each query against its positive and one negative of the same row (keys detached); the
    positive is column 0."""
    with torch.autocast(query.device.type, enabled=False):
        query, positive = _float32(query, positive.detach())
        positive_logit = (query * positive).sum(dim=1, keepdim=True)
        rows = [torch.cat([positive_logit, (query * negative.detach().float()).sum(dim=1, keepdim=True)], dim=1)
                for negative in negatives]
        return torch.cat(rows) / temperature


def info_nce_loss(logits: Tensor) -> Tensor:
    """Mean cross-entropy of logits whose positive is column 0 (MoCo's/SeCo's NCESoftmaxLoss)."""
    return F.cross_entropy(logits.float(), torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def positive_top1(logits: Tensor) -> Tensor:
    """Fraction of rows whose largest logit is the positive (column 0)."""
    return (logits.argmax(dim=1) == 0).float().mean()
