"""DMU: Darwinian Model Upgrades, selective backward compatibility (Zhang et al., AAAI 2023, arXiv
2210.06954; method card 11 of ``face_and_retrieval.md``). The authors' code is not public (the
OpenCompatible snapshot holds RACT only); this is the card's reconstruction, UNVERIFIED.

1. BCT's setting (:class:`~lightning_modules.retrieval.bct.BackwardCompatibleTraining`): the new
   model's margin softmax plus the influence loss of the old classifier on the new features.
2. Selective inheritance: each sample's influence term is weighted by how discriminative its old
   feature is, ω_i = max(0, cos(φ_old(x_i), w_old,y_i)), the cosine of the old feature to its
   class's old-classifier row (the old centre, or for a class the old model never saw the mean
   old feature); L = L_cls + λ·mean_i(ω_i·L_bc,i).
3. Forward adaptation: the old gallery's features are moved toward the new space by ψ, trained
   after this stage on training pairs
   (:class:`~lightning_modules.retrieval.forward_transformation.ForwardTransformation`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.retrieval.bct import BackwardCompatibleTraining


class DarwinianModelUpgrade(BackwardCompatibleTraining):
    """DMU's selective backward-compatible stage (module docstring); BCT's arguments."""

    method_name = "dmu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_rows: Tensor | None = None  # every class's old-classifier row, for the weights

    def on_fit_start(self) -> None:
        super().on_fit_start()
        rows = self.old_classifier_rows(0, self.hparams.num_classes)
        self.old_rows = F.normalize(rows.float(), dim=1).to(self.device)

    @torch.no_grad()
    def influence_weights(self, images: Tensor, labels: Tensor) -> Tensor:
        """ω [B] (module docstring, 2)."""
        old_features = F.normalize(self.old_model(images).float(), dim=1)
        weights = (old_features * self.old_rows[labels]).sum(dim=1).clamp_min(0.0)
        self.log("train/compatibility_weight", weights.mean(), batch_size=len(images))
        return weights
