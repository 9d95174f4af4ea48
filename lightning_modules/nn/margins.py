"""Margin heads: cosines between normalised embeddings and class centres -> logits.

Every head works on one device and on a class shard (a contiguous slice of the classes, see
:mod:`lightning_modules.distributed.model_parallel_softmax`). A head sees the cosines of
the whole (gathered) batch with its shard's classes, which of the rows have their target
in the shard and in which column, and a ``reduce`` that sums a per-sample statistic over
all shards (identity on one device). Statistics taken with ``reduce`` (the target cosine,
NPCFace's hard-negative mean) never carry gradient: the heads use them for thresholds and
margins, as the authors' code does under ``no_grad``; gradients come from the local cosines.

- :class:`SoftmaxHead`: normalised softmax, s·cos.
- :class:`CombinedMarginHead`: ArcFace / CosFace / combined margin, s·(cos(m1·θ + m2) − m3).
- :class:`CurricularFaceHead`: ArcFace target, adaptively emphasised hard negatives.
- :class:`NPCFaceHead`: target margin tied to the hardness of the sample's negatives.
- :class:`SearchSoftmaxHead`: s·cos with the LFS modulation of the target probability.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

Reduce = Callable[[Tensor], Tensor]

# Cosines are clamped to [-1 + eps, 1 - eps] before arccos, so that d arccos / d cos stays finite.
_ARCCOS_EPS = 1e-7


def _identity(x: Tensor) -> Tensor:
    return x


def _angle(cos: Tensor) -> Tensor:
    return torch.acos(cos.clamp(-1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS))


def _target_index(target_in_shard: Tensor, target_col: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, columns) of the targets that lie in this shard."""
    rows = target_in_shard.nonzero().squeeze(1)
    return rows, target_col[rows]


def _target_cos(cos: Tensor, rows: Tensor, cols: Tensor, reduce: Reduce) -> Tensor:
    """cos θ_y of every sample [N] (without gradient): each shard gives the targets it owns."""
    with torch.no_grad():
        return reduce(cos.new_zeros(cos.shape[0]).index_put((rows,), cos[rows, cols]))


def margin_cos(cos: Tensor, m1: float, m2: float, m3: float) -> Tensor:
    """cos(m1·θ + m2) − m3 of a target cosine, with ArcFace's fallback past π.

    Where m1·θ + m2 > π the angular margin would make the logit grow again with θ; the
    fallback cos θ − m2·sin(π − m2) (arcface_torch, older ``losses.py``) keeps it decreasing.
    CosFace (m1 = 1, m2 = 0) needs no angle and is computed exactly.
    """
    if m1 == 1.0 and m2 == 0.0:
        return cos - m3
    theta = _angle(cos)
    angular = torch.cos(m1 * theta + m2)
    fallback = cos - m2 * math.sin(math.pi - m2)
    return torch.where(m1 * theta + m2 <= math.pi, angular, fallback) - m3


class MarginHead(nn.Module):
    """Base class: ``logits`` from cosines of a class shard, ``loss`` from log p(target).
    ``name`` names the method in run directories and results."""

    name = "margin_softmax"

    def __init__(self, s: float) -> None:
        super().__init__()
        self.scale = s

    def logits(self, cos: Tensor, target_in_shard: Tensor, target_col: Tensor, reduce: Reduce) -> Tensor:
        """Logits [N, C_local] from cosines [N, C_local].

        ``target_in_shard`` [N] marks the samples whose class is in this shard and
        ``target_col`` [N] its column there (valid where marked); ``reduce`` sums a tensor
        over all shards.
        """
        raise NotImplementedError

    def loss(self, log_p_target: Tensor) -> Tensor:
        """Per-sample loss [N] from the log softmax probability of the target."""
        return -log_p_target

    def forward(self, cos: Tensor, labels: Tensor) -> Tensor:
        """Logits over all classes on one device."""
        return self.logits(cos, torch.ones_like(labels, dtype=torch.bool), labels, _identity)


class SoftmaxHead(MarginHead):
    """Normalised softmax (s·cos for every class), the baseline of the margin heads."""

    name = "softmax"

    def __init__(self, s: float = 64.0) -> None:
        super().__init__(s)

    def logits(self, cos: Tensor, target_in_shard: Tensor, target_col: Tensor, reduce: Reduce) -> Tensor:
        return self.scale * cos


class CombinedMarginHead(MarginHead):
    """Unified margin softmax: target s·(cos(m1·θ_y + m2) − m3), non-targets s·cos θ_j.

    ArcFace (Deng et al., CVPR 2019) is (1, 0.5, 0), CosFace (Wang et al., CVPR 2018) is
    (1, 0, 0.4), InsightFace's combined margin is (1, 0.3, 0.2). Defaults s=64 and ArcFace's
    margins as arcface_torch (``configs/base.py`` ``margin_list``, ``losses.py``).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0) -> None:
        super().__init__(s)
        self.m1, self.m2, self.m3 = m1, m2, m3

    @property
    def name(self) -> str:
        if self.m1 == 1.0 and self.m3 == 0.0:
            return "arcface"
        if self.m1 == 1.0 and self.m2 == 0.0:
            return "cosface"
        return "combined_margin"

    def logits(self, cos: Tensor, target_in_shard: Tensor, target_col: Tensor, reduce: Reduce) -> Tensor:
        rows, cols = _target_index(target_in_shard, target_col)
        target = margin_cos(cos[rows, cols], self.m1, self.m2, self.m3)
        return self.scale * cos.index_put((rows, cols), target)


class CurricularFaceHead(MarginHead):
    """CurricularFace (Huang et al., CVPR 2020, arXiv 2004.00288).

    Target: ArcFace's cos(θ_y + m) with its fallback. Negatives with cos θ_j > cos(θ_y + m)
    are hard and become cos θ_j·(t + cos θ_j); t follows the batch mean of cos θ_y,
    t ← 0.01·mean + 0.99·t (from 0, updated before use, once per training forward, over the
    global batch). Defaults s=64, m=0.5 from the official README/config (the card, FaceX-Zoo
    ``head/CurricularFace.py``).
    """

    name = "curricularface"
    t: Tensor

    def __init__(self, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(s)
        self.m = m
        self.register_buffer("t", torch.zeros(()))

    def logits(self, cos: Tensor, target_in_shard: Tensor, target_col: Tensor, reduce: Reduce) -> Tensor:
        rows, cols = _target_index(target_in_shard, target_col)
        cos_y = _target_cos(cos, rows, cols, reduce)
        with torch.no_grad():
            if self.training:
                self.t.mul_(0.99).add_(0.01 * cos_y.mean())
            threshold = torch.cos(_angle(cos_y) + self.m)
        # The target's own column passes the threshold too; it is overwritten below.
        out = torch.where(cos > threshold[:, None], cos * (self.t + cos), cos)
        target = margin_cos(cos[rows, cols], 1.0, self.m, 0.0)
        return self.scale * out.index_put((rows, cols), target)


class NPCFaceHead(MarginHead):
    """NPCFace (Zeng et al., arXiv 2007.10172), as FaceX-Zoo ``head/NPCFace.py`` (the authors').

    Hard negatives H = {j ≠ y : cos θ_j > cos(θ_y + m)} with the fixed m; their mean cosine
    h̄ (0 if H is empty; over all shards) gives the sample's margin m' = m0 + m1·h̄, without
    gradient. Target cos(θ_y + m') where cos θ_y > 0, else cos θ_y; hard negatives t·cos + a;
    all scaled by s. Defaults m0=0.4, m1=0.2, t=1.1, a=0.2, m=0.5, s=64 from that code.
    """

    name = "npcface"

    def __init__(
        self, s: float = 64.0, m: float = 0.5, m0: float = 0.4, m1: float = 0.2, t: float = 1.1, a: float = 0.2
    ) -> None:
        super().__init__(s)
        self.m, self.m0, self.m1, self.t, self.a = m, m0, m1, t, a

    def logits(self, cos: Tensor, target_in_shard: Tensor, target_col: Tensor, reduce: Reduce) -> Tensor:
        rows, cols = _target_index(target_in_shard, target_col)
        cos_y = _target_cos(cos, rows, cols, reduce)
        with torch.no_grad():
            threshold = torch.cos(_angle(cos_y) + self.m)
            hard = (cos > threshold[:, None]).index_put((rows, cols), torch.zeros_like(rows, dtype=torch.bool))
            count = reduce(hard.sum(1).to(cos.dtype))
            mean_hard = reduce(torch.where(hard, cos, 0.0).sum(1)) / count.clamp_min(1.0)
            margin = self.m0 + self.m1 * mean_hard
        out = torch.where(hard, self.t * cos + self.a, cos)
        own = cos[rows, cols]
        target = torch.where(own > 0, torch.cos(_angle(own) + margin[rows]), own)
        return self.scale * out.index_put((rows, cols), target)


class SearchSoftmaxHead(SoftmaxHead):
    """Search-Softmax's loss (Wang et al., ICML 2020, arXiv 2007.06542) on s·cos logits.

    The target probability is modulated as p' = p / (α·p + 1 − α) with α = a·e^{s/3} and
    a ≤ 0 (code ``search_type='global'``); the loss is −log p'. ``a`` is set by the search.
    Defaults s=32 (LFS code) and a=−1 (the card's no-search ablation).
    """

    name = "search_softmax"

    def __init__(self, s: float = 32.0, a: float = -1.0) -> None:
        super().__init__(s)
        self.a = a

    @property
    def a(self) -> float:
        return self._a

    @a.setter
    def a(self, value: float) -> None:
        if value > 0:
            raise ValueError(f"Search-Softmax needs a <= 0 (the margin lowers p), got {value}")
        self._a = value

    def loss(self, log_p_target: Tensor) -> Tensor:
        # −log p' = −log p + log(1 − α(1 − p)), with 1 − p = −expm1(log p): finite for p → 0.
        alpha = self.a * math.exp(self.scale / 3.0)
        return -log_p_target + torch.log1p(alpha * torch.expm1(log_p_target))
