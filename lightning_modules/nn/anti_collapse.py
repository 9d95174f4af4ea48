"""The Anti-Collapse loss for deep metric learning (arXiv 2407.03106, 2024; its ``criteria/antico.py``
as read for method card 13 of ``face_and_retrieval.md``), in plain torch.

- :func:`coding_rate`: the coding rate of the columns of a d×m matrix Z in the code's two forms,
  ε used as is (not squared): over the m columns ``R_m = ½ logdet(I_m + γ1·m/(d·ε)·ZᵀZ)``, or
  over the d rows ``R_d = ½ logdet(I_d + γ1·d/(m·ε)·ZZᵀ)``; in float32 outside autocast.
- :func:`proxy_anchor_loss`: the code's ``panc`` alignment, cosine similarities s, α = 64,
  δ = 0.1: the mean over the samples of log(1 + Σ_{x: y_x = y_i} e^{−α(s(x, p_{y_i}) − δ)}) (each
  sample's positive proxy, duplicates counted) plus the mean over all C proxies of
  log(1 + Σ_{x: y_x ≠ c} e^{α(s(x, p_c) + δ)}).
- :class:`AntiCollapseLoss`: w_align·L_PA + w_ac·exp(−γ2·R), R of the batch's classes' proxies
  (``batch_proxy``, the default), of all proxies (``all_proxy``), or of the batch embeddings
  (``pair``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def coding_rate(z: Tensor, epsilon: float = 0.5, gamma: float = 1.0, over: Literal["columns", "rows"] = "columns") -> Tensor:
    """R_m (``columns``) or R_d (``rows``) of ``z`` [d, m] (module docstring)."""
    with torch.autocast(z.device.type, enabled=False):
        z = z.float()
        d, m = z.shape
        if over == "columns":
            gram, scale = z.T @ z, gamma * m / (d * epsilon)
        else:
            gram, scale = z @ z.T, gamma * d / (m * epsilon)
        identity = torch.eye(len(gram), device=z.device)
        return 0.5 * torch.logdet(identity + scale * gram)


def proxy_anchor_loss(embeddings: Tensor, labels: Tensor, proxies: Tensor, alpha: float = 64.0, delta: float = 0.1) -> Tensor:
    """The code's Proxy-Anchor alignment (module docstring); ``embeddings`` [B, D], ``proxies`` [C, D]."""
    similarity = F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T  # [B, C]
    same = F.one_hot(labels, len(proxies)).bool()
    positive = torch.where(same, torch.exp(-alpha * (similarity - delta)), torch.zeros_like(similarity)).sum(dim=0)  # [C]
    negative = torch.where(~same, torch.exp(alpha * (similarity + delta)), torch.zeros_like(similarity)).sum(dim=0)
    return torch.log1p(positive[labels]).mean() + torch.log1p(negative).mean()


class AntiCollapseLoss(nn.Module):
    """w_align·L_PA + w_ac·exp(−γ2·R) over ``num_classes`` learnable proxies (randn/8 at
    initialisation); defaults of the card: γ1 = γ2 = 1, ε = 0.5, w_ac = 1, w_align 0.0035 (the
    runs'), ``variant`` ``batch_proxy``."""

    def __init__(self, num_classes: int, embedding_size: int, variant: Literal["batch_proxy", "all_proxy", "pair"] = "batch_proxy",
                 align_weight: float = 0.0035, anti_collapse_weight: float = 1.0, epsilon: float = 0.5,
                 gamma1: float = 1.0, gamma2: float = 1.0, alpha: float = 64.0, delta: float = 0.1) -> None:
        super().__init__()
        if variant not in ("batch_proxy", "all_proxy", "pair"):
            raise ValueError(f"anti-collapse variant must be batch_proxy, all_proxy or pair; got {variant!r}")
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size) / 8)
        self.variant, self.align_weight, self.anti_collapse_weight = variant, align_weight, anti_collapse_weight
        self.epsilon, self.gamma1, self.gamma2, self.alpha, self.delta = epsilon, gamma1, gamma2, alpha, delta

    def rate(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.variant == "pair":
            return coding_rate(F.normalize(embeddings, dim=1).T, self.epsilon, self.gamma1, over="rows")
        proxies = self.proxies[labels.unique()] if self.variant == "batch_proxy" else self.proxies
        return coding_rate(F.normalize(proxies, dim=1).T, self.epsilon, self.gamma1, over="columns")

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, L_PA, R)."""
        alignment = proxy_anchor_loss(embeddings, labels, self.proxies, self.alpha, self.delta)
        rate = self.rate(embeddings, labels)
        return self.align_weight * alignment + self.anti_collapse_weight * torch.exp(-self.gamma2 * rate), alignment, rate
