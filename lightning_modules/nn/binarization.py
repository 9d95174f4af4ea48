"""Recurrent binarization of float embeddings (BEBR: Gan, Ge, Zhou et al., "Binary Embedding-based
Retrieval at Tencent", KDD 2023, arXiv 2302.08714; method card 12 of ``face_and_retrieval.md``).
No public code: the structure is the card's (third-party summaries), every constant UNVERIFIED.

- :func:`sign_ste`: sign (0 ↦ +1) forward; backward the straight-through estimator of
  BinaryConnect (Courbariaux et al. 2015), the gradient passed unchanged where |x| ≤ 1 and
  zeroed outside (without it no gradient reaches the encoder: the card's pitfall).
- :class:`RecurrentBinarizer`: from x₀ = the float embedding, for t = 1 … u + 1:
  b_t = sign(MLP_bin,t(x_{t−1})), x̂_t = MLP_rec,t(b_t), x_t = x_{t−1} − x̂_t; the code is
  [b_1, …, b_{u+1}] (m·(u+1) bits), the reconstruction x̃ = Σ_t x̂_t. Each round has its own
  MLPs (residual blocks, :class:`~lightning_modules.nn.compatibility.ResidualMLP`): the
  residuals shrink from round to round, which one shared decoder could not follow.
- :func:`queue_nce_loss`: the NCE-form contrastive loss of the reconstructions against their
  float embeddings, the negatives a queue of earlier float embeddings, optionally only the k
  hardest of them (the card's hard-negative mining).

Plain torch, no Lightning.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.compatibility import ResidualMLP
from lightning_modules.nn.contrastive import info_nce_logits, info_nce_loss


def sign_ste(x: Tensor) -> Tensor:
    """±1 (sign, 0 ↦ +1) with the clipped straight-through gradient (module docstring)."""
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (torch.where(x >= 0, 1.0, -1.0).to(x) - clipped).detach()


class RecurrentBinarizer(nn.Module):
    """Float embeddings [N, D] → (codes [N, (u+1)·m] in ±1, reconstruction [N, D]) by ``1 +
    extra_rounds`` rounds of ``code_bits`` = m bits each (module docstring). Each MLP is a
    linear map between D and m around ``blocks`` residual blocks of width ``hidden_size``; each
    decoder's linear starts with weights of std (m·D)^(−1/2), so that a code decodes to about unit
    norm, the embeddings' scale, and the first residual is not dominated by its own round."""

    def __init__(self, embedding_size: int, code_bits: int, extra_rounds: int = 1, hidden_size: int = 1024,
                 blocks: int = 1) -> None:
        super().__init__()
        if code_bits < 8 or code_bits % 8:
            raise ValueError(f"code_bits must be a positive multiple of 8 (codes are stored in bytes); got {code_bits}")
        if extra_rounds < 0:
            raise ValueError(f"extra_rounds (u) must be 0 or more; got {extra_rounds}")
        self.code_bits, self.rounds = code_bits, extra_rounds + 1
        self.encoders = nn.ModuleList(nn.Sequential(ResidualMLP(embedding_size, hidden_size, blocks),
                                                    nn.Linear(embedding_size, code_bits)) for _ in range(self.rounds))
        self.decoders = nn.ModuleList(nn.Sequential(nn.Linear(code_bits, embedding_size),
                                                    ResidualMLP(embedding_size, hidden_size, blocks)) for _ in range(self.rounds))
        for decoder in self.decoders:
            nn.init.normal_(decoder[0].weight, std=(code_bits * embedding_size) ** -0.5)
            nn.init.zeros_(decoder[0].bias)

    @property
    def bits(self) -> int:
        """Bits per vector, m·(u+1)."""
        return self.code_bits * self.rounds

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        residual, reconstruction, codes = features, torch.zeros_like(features), []
        for encoder, decoder in zip(self.encoders, self.decoders):
            code = sign_ste(encoder(residual))
            part = decoder(code)
            reconstruction, residual = reconstruction + part, residual - part
            codes.append(code)
        return torch.cat(codes, dim=1), reconstruction

    def decode(self, codes: Tensor) -> Tensor:
        """The reconstruction [N, D] of stored codes [N, (u+1)·m] (±1, or 0/1 bits)."""
        if codes.shape[1] != self.bits:
            raise ValueError(f"codes have {codes.shape[1]} bits, this binarizer writes {self.bits}")
        signs = codes.float() * 2 - 1 if codes.dtype in (torch.bool, torch.uint8) else codes.float()
        return sum(decoder(part) for decoder, part in zip(self.decoders, signs.split(self.code_bits, dim=1)))


def queue_nce_loss(query: Tensor, positive: Tensor, queue: Tensor, temperature: float = 0.07,
                   hard_negatives: Optional[int] = None) -> Tensor:
    """NCE of ``query`` [N, D] (L2-normalised inside) against its ``positive`` [N, D] and the
    ``queue`` [K, D] of negatives (both detached), over the ``hard_negatives`` of highest
    similarity to each query (all K for None)."""
    logits = info_nce_logits(F.normalize(query, dim=1), positive, queue, temperature)
    if hard_negatives is not None and hard_negatives < queue.shape[0]:
        logits = torch.cat([logits[:, :1], logits[:, 1:].topk(hard_negatives, dim=1).values], dim=1)
    return info_nce_loss(logits)
