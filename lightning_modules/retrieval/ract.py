"""RACT: Regression-Alleviating Compatible Training for hot-refresh model upgrades (Zhang, Ge,
Shen et al., ICLR 2022; TencentARC/OpenCompatible; method card 7 of ``face_and_retrieval.md``).

In a hot-refresh upgrade the new model answers queries at once while the gallery is re-embedded
little by little; a query can then find an old-feature positive ranked below a new-feature
negative (a negative flip). RACT asks each new feature to be closer to its own image's old
feature than to both the old and the new features of the other classes:

1. The new model (:class:`~lightning_modules.retrieval.model.LandmarkRetrieval`) and the frozen
   old model (``old_checkpoint``) embed the same augmented batch; both L2-normalised, the old
   features without gradient.
2. The features and labels of every rank are gathered without gradient (as the authors'
   ``all_gather``), so the negatives come from the global batch.
3. ``contra_ract`` (default): ℓ_i = −log e^{⟨n_i,o_i⟩/τ} / (e^{⟨n_i,o_i⟩/τ} + Σ_{y_j≠y_i} e^{⟨n_i,o_j⟩/τ}
   + Σ_{y_j≠y_i} e^{⟨n_i,n_j⟩/τ}), τ = 0.01, entries of the anchor's class masked out of both
   sets; ``topk_negatives`` > 0 keeps the hardest k of each set (the README's example: 10).
   ``triplet_ract``: a margin ranking (0.8) against the 10 hardest of each set.
4. L = L_cls + λ·L_RACT, λ = ``comp_weight`` = 1, L_cls the new model's margin softmax.
5. Test: the compatibility table with the hot-refresh curve (``compatibility.refresh_ratios``).

Deviations from the authors' code: the ``bct_ract`` variant (old- and new-classifier logits in
one softmax) is not offered, since the classifiers here are sharded over the ranks; the
classifier is the margin head of :class:`LandmarkRetrieval` (RACT's ``arcface`` option, s 30,
m 0.3), where its default is a linear softmax.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_modules.distributed.comm import all_gather
from lightning_modules.nn.compatibility import ract_contrastive_loss, ract_triplet_loss
from lightning_modules.retrieval.model import LandmarkRetrieval


def gathered_ract_loss(new: Tensor, old: Tensor, labels: Tensor, kind: Literal["contra_ract", "triplet_ract"] = "contra_ract",
                       temperature: float = 0.01, topk: int = 0, margin: float = 0.8) -> Tensor:
    """RACT's loss of this rank's anchors against the global batch, gathered without gradient
    (module docstring, 2-3); on one process the batch is its own, detached alike."""
    gathered = all_gather(new.detach()), all_gather(old.detach()), all_gather(labels)
    if kind == "contra_ract":
        return ract_contrastive_loss(new, old, labels, *gathered, temperature=temperature, topk=topk)
    return ract_triplet_loss(new, old, labels, *gathered, margin=margin, topk=topk if topk > 0 else 10)


class RegressionAlleviatingCompatibleTraining(LandmarkRetrieval):
    """RACT (module docstring). Takes :class:`LandmarkRetrieval`'s arguments; ``old_checkpoint``
    is required. ``comp_loss`` ``contra_ract`` or ``triplet_ract``, ``comp_weight`` λ,
    ``temperature`` τ, ``topk_negatives`` (0: all; the triplet's default 10), ``triplet_margin``."""

    method_name = "ract"

    def __init__(self, *args: Any, comp_loss: Literal["contra_ract", "triplet_ract"] = "contra_ract", comp_weight: float = 1.0,
                 temperature: float = 0.01, topk_negatives: int = 0, triplet_margin: float = 0.8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.old_model is None:
            raise ValueError("RACT needs model.init_args.old_checkpoint: the last.ckpt of the old model's run")
        if comp_loss not in ("contra_ract", "triplet_ract"):
            raise ValueError(f"model.comp_loss must be 'contra_ract' or 'triplet_ract'; got {comp_loss!r}")
        self.comp_loss, self.comp_weight, self.temperature = comp_loss, comp_weight, temperature
        self.topk_negatives, self.triplet_margin = topk_negatives, triplet_margin

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        new = self(images)
        with torch.no_grad():
            old = self.old_model(images)
        loss_cls = self.softmax(new, labels)
        # in float32: logits of 1/τ = 100 lose their ranks in bfloat16
        loss_comp = gathered_ract_loss(new.float(), old.float(), labels, self.comp_loss, self.temperature,
                                       self.topk_negatives, self.triplet_margin)
        loss = loss_cls + self.comp_weight * loss_comp
        size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({"train/loss_cls": loss_cls, "train/loss_ract": loss_comp}, batch_size=size)
        return loss
