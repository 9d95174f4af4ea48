"""BYOL's parts (Grill et al., "Bootstrap your own latent", NeurIPS 2020), as CSTP's released code
(Katou2/CSTP, ``models/pace/r21d_byol.py``) uses them: the projector and predictor MLPs and the
symmetric normalised-regression loss. The target network is an EMA copy of the online backbone
and projector (:mod:`lightning_modules.nn.momentum`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear – BatchNorm1d – ReLU – Linear: BYOL's projector and predictor (512 → 4096 → 512 in
    CSTP) and CSTP's prediction heads."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_features),
            nn.BatchNorm1d(hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, out_features),
        )


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """2 − 2·cos(prediction, target) per row [B]: the squared distance of the L2-normalised vectors."""
    return 2 - 2 * (F.normalize(prediction, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)


def symmetric_byol_loss(prediction1: Tensor, prediction2: Tensor, target1: Tensor, target2: Tensor) -> Tensor:
    """BYOL's symmetrised loss per sample [B]: the online prediction of view 1 regresses the target
    projection of view 2, and the other way round; the two terms are summed (range [0, 8])."""
    return regression_loss(prediction1, target2) + regression_loss(prediction2, target1)
