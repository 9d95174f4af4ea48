"""Margin heads: cosines between normalised embeddings and class centres -> logits.

A head gives a sample's logit for its own class (``target_logit``, from the target cosine)
and, element-wise, for every other class (``negative_logits``), both given per-sample
quantities (``row_state``) taken without gradient from the target cosines and, where a head
needs them, from sums over the sample's negative classes, as the authors' code computes them
under ``no_grad``. Gradients come from the cosines only. The split lets
:mod:`lightning_modules.distributed.model_parallel_softmax` work on chunks of a class shard
(a contiguous slice of the classes on one rank) without ever holding a sample's whole row of
logits; ``forward`` composes the pieces over all classes on one device.

- :class:`SoftmaxHead`: normalised softmax, s·cos.
- :class:`CombinedMarginHead`: ArcFace / CosFace / combined margin, s·(cos(m1·θ + m2) − m3).
- :class:`CurricularFaceHead`: ArcFace target, adaptively emphasised hard negatives.
- :class:`NPCFaceHead`: target margin tied to the hardness of the sample's negatives.
- :class:`SearchSoftmaxHead`: s·cos with the LFS modulation of the target probability.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A per-sample statistic of one chunk of classes: (cosines [N, c], negative [N, c] marking the
# classes that are not the sample's own) -> [N, k], summed over the chunk's columns.
NegativeStatistic = Callable[[Tensor, Tensor], Tensor]
# Sums a NegativeStatistic over all classes (every chunk, every shard) -> [N, k], no gradient.
SumOverNegatives = Callable[[NegativeStatistic], Tensor]

# Cosines are clamped to [-1 + eps, 1 - eps] before arccos, so that d arccos / d cos stays finite.
_ARCCOS_EPS = 1e-7


def _angle(cos: Tensor) -> Tensor:
    return torch.acos(cos.clamp(-1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS))


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
    """Base class: logits of a sample from its target cosine and, element-wise, the cosines
    of its negative classes (module docstring); ``loss`` from log p(target). ``name`` names
    the method in run directories and results."""

    name = "margin_softmax"

    def __init__(self, s: float) -> None:
        super().__init__()
        self.scale = s

    def row_state(self, cos_y: Tensor, sum_over_negatives: SumOverNegatives) -> Any:
        """Per-sample quantities the logits need (no gradient), from the target cosines [N]
        of the whole batch; called once per forward (a training forward may update buffers)."""
        return None

    def target_logit(self, cos_y: Tensor, state: Any) -> Tensor:
        """Logit [N] of each sample's own class from its cosine [N]."""
        raise NotImplementedError

    def negative_logits(self, cos: Tensor, state: Any) -> Tensor:
        """Logits [N, c] of other classes from their cosines [N, c], element-wise."""
        return self.scale * cos

    def loss(self, log_p_target: Tensor) -> Tensor:
        """Per-sample loss [N] from the log softmax probability of the target."""
        return -log_p_target

    def forward(self, cos: Tensor, labels: Tensor) -> Tensor:
        """Logits [N, C] over all classes on one device from cosines [N, C]."""
        is_target = F.one_hot(labels, cos.shape[1]).bool()
        cos_y = cos.gather(1, labels[:, None]).squeeze(1)
        state = self.row_state(cos_y.detach(), lambda statistic: statistic(cos.detach(), ~is_target))
        return torch.where(is_target, self.target_logit(cos_y, state)[:, None], self.negative_logits(cos, state))


class SoftmaxHead(MarginHead):
    """Normalised softmax (s·cos for every class), the baseline of the margin heads."""

    name = "softmax"

    def __init__(self, s: float = 64.0) -> None:
        super().__init__(s)

    def target_logit(self, cos_y: Tensor, state: Any) -> Tensor:
        return self.scale * cos_y


class CombinedMarginHead(MarginHead):
    """Unified margin softmax: target s·(cos(m1·θ_y + m2) − m3), non-targets s·cos θ_j.

    ArcFace (Deng et al., CVPR 2019) is (1, 0.5, 0), CosFace (Wang et al., CVPR 2018) is
    (1, 0, 0.4), InsightFace's combined margin is (1, 0.3, 0.2). Defaults s=64 and ArcFace's
    margins as arcface_torch (``configs/base.py`` ``margin_list``, ``losses.py``).

    ``margin_gradient`` (an angular margin only; CosFace's is the same either way):

    - ``"exact"`` (default; the paper and arcface_torch before Dec 2022): the derivative of
      cos(m1·θ + m2) with respect to cos θ, and the fallback cos θ − m2·sin(π − m2) past π.
    - ``"straight_through"`` (arcface_torch's ``CombinedMarginLoss`` since commit 657ae30e, Dec
      2022, which applies the margin in place under ``no_grad``): the forward value
      cos(m1·θ + m2) − m3 without the fallback, and the gradient of the plain cosine.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 margin_gradient: Literal["exact", "straight_through"] = "exact") -> None:
        super().__init__(s)
        if margin_gradient not in ("exact", "straight_through"):
            raise ValueError(f"margin_gradient must be 'exact' (the paper) or 'straight_through' (arcface_torch "
                             f"since Dec 2022), got {margin_gradient!r}")
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.margin_gradient = margin_gradient

    @property
    def name(self) -> str:
        if self.m1 == 1.0 and self.m3 == 0.0:
            return "arcface"
        if self.m1 == 1.0 and self.m2 == 0.0:
            return "cosface"
        return "combined_margin"

    def target_logit(self, cos_y: Tensor, state: Any) -> Tensor:
        if self.margin_gradient == "exact":
            return self.scale * margin_cos(cos_y, self.m1, self.m2, self.m3)
        with torch.no_grad():
            margin = torch.cos(self.m1 * _angle(cos_y) + self.m2) - self.m3 - cos_y
        return self.scale * (cos_y + margin)


class HardNegativeState(NamedTuple):
    """Per-sample state of the heads that treat hard negatives apart: ``threshold`` [N], the
    cosine above which a negative is hard (cos(θ_y + m)), and ``value``: CurricularFace's t (a
    scalar), NPCFace's target margin m' [N]."""

    threshold: Tensor
    value: Tensor


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

    @torch.no_grad()
    def row_state(self, cos_y: Tensor, sum_over_negatives: SumOverNegatives) -> HardNegativeState:
        """The hardness threshold cos(θ_y + m) [N] and t, t updated first in training."""
        if self.training:
            self.t.mul_(0.99).add_(0.01 * cos_y.mean())
        return HardNegativeState(threshold=torch.cos(_angle(cos_y) + self.m), value=self.t.clone())

    def target_logit(self, cos_y: Tensor, state: HardNegativeState) -> Tensor:
        return self.scale * margin_cos(cos_y, 1.0, self.m, 0.0)

    def negative_logits(self, cos: Tensor, state: HardNegativeState) -> Tensor:
        t = state.value
        return self.scale * torch.where(cos > state.threshold[:, None], cos * (t + cos), cos)


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

    @torch.no_grad()
    def row_state(self, cos_y: Tensor, sum_over_negatives: SumOverNegatives) -> HardNegativeState:
        """The hardness threshold cos(θ_y + m) [N] and the margin m' [N]."""
        threshold = torch.cos(_angle(cos_y) + self.m)

        def hard_count_and_sum(cos: Tensor, negative: Tensor) -> Tensor:
            hard = negative & (cos > threshold[:, None])
            return torch.stack([hard.sum(1).to(cos.dtype), torch.where(hard, cos, 0.0).sum(1)], dim=1)

        count, total = sum_over_negatives(hard_count_and_sum).unbind(1)
        return HardNegativeState(threshold=threshold, value=self.m0 + self.m1 * total / count.clamp_min(1.0))

    def target_logit(self, cos_y: Tensor, state: HardNegativeState) -> Tensor:
        margin = state.value
        return self.scale * torch.where(cos_y > 0, torch.cos(_angle(cos_y) + margin), cos_y)

    def negative_logits(self, cos: Tensor, state: HardNegativeState) -> Tensor:
        return self.scale * torch.where(cos > state.threshold[:, None], self.t * cos + self.a, cos)


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
