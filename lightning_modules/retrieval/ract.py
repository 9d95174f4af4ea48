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
   ``bct_ract`` (the authors' ``trainer.py``): one softmax over the new feature's logits against
   the old classifier **and** the new one, the own class masked out of the new classifier's,
   the target the own old class: ℓ_i = −z^old_{y_i} + log(Σ_j e^{z^old_j} + Σ_{j≠y_i} e^{z^new_j}).
   Both classifiers are sharded over the ranks; each gives its (target, log-sum-exp of the
   others) over all shards (:meth:`~lightning_modules.distributed.model_parallel_softmax.ModelParallelSoftmax.logit_terms`),
   combined here. The old classifier is BCT's
   (:class:`~lightning_modules.retrieval.bct.BackwardCompatibleTraining`: the old centres laid
   over the new classes by landmark id, new classes at their mean old feature).
4. L = L_cls + λ·L_RACT, λ = ``comp_weight`` = 1, L_cls the new model's margin softmax; with
   ``influence_weight`` > 0 also BCT's influence loss (0 by default: RACT alone, the paper's).
5. Test: the compatibility table with the hot-refresh curve (``compatibility.refresh_ratios``).

Deviations from the authors' code: the classifier is the margin head of
:class:`LandmarkRetrieval` (RACT's ``arcface`` option, s 30, m 0.3), where its default is a
linear softmax; in ``bct_ract`` the old classifier's logits are the old centres' cosines under
the same head (``old_head``, BCT's), where the authors apply the old model's linear layer to the
unnormalised feature.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_modules.distributed.comm import all_gather
from lightning_modules.distributed.model_parallel_softmax import ModelParallelSoftmax
from lightning_modules.nn.compatibility import ract_contrastive_loss, ract_triplet_loss
from lightning_modules.retrieval.bct import BackwardCompatibleTraining

COMPATIBLE_LOSSES = ("contra_ract", "triplet_ract", "bct_ract")


def gathered_ract_loss(new: Tensor, old: Tensor, labels: Tensor, kind: Literal["contra_ract", "triplet_ract"] = "contra_ract",
                       temperature: float = 0.01, topk: int = 0, margin: float = 0.8) -> Tensor:
    """RACT's loss of this rank's anchors against the global batch, gathered without gradient
    (module docstring, 2-3); on one process the batch is its own, detached alike."""
    gathered = all_gather(new.detach()), all_gather(old.detach()), all_gather(labels)
    if kind == "contra_ract":
        return ract_contrastive_loss(new, old, labels, *gathered, temperature=temperature, topk=topk)
    return ract_triplet_loss(new, old, labels, *gathered, margin=margin, topk=topk if topk > 0 else 10)


def bct_ract_loss(old_classifier: ModelParallelSoftmax, embeddings: Tensor, labels: Tensor, new_negatives: Tensor) -> Tensor:
    """``bct_ract`` (module docstring, 3): the old classifier's target logit against all its other
    classes and ``new_negatives``, the new classifier's log-sum-exp of all its classes but the
    own (its :meth:`~ModelParallelSoftmax.logit_terms`), one softmax over the global batch."""
    old_target, old_negatives = old_classifier.logit_terms(embeddings, labels)
    return old_classifier.loss_from_terms(old_target, torch.logaddexp(old_negatives, new_negatives))


class RegressionAlleviatingCompatibleTraining(BackwardCompatibleTraining):
    """RACT (module docstring). Takes :class:`BackwardCompatibleTraining`'s arguments
    (``old_checkpoint`` required; ``influence_weight`` 0 by default); ``comp_loss``
    ``contra_ract``, ``triplet_ract`` or ``bct_ract``, ``comp_weight`` λ, ``temperature`` τ,
    ``topk_negatives`` (0: all; the triplet's default 10), ``triplet_margin``."""

    method_name = "ract"

    def __init__(self, *args: Any, comp_loss: Literal["contra_ract", "triplet_ract", "bct_ract"] = "contra_ract",
                 comp_weight: float = 1.0, temperature: float = 0.01, topk_negatives: int = 0, triplet_margin: float = 0.8,
                 influence_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, influence_weight=influence_weight, **kwargs)
        if comp_loss not in COMPATIBLE_LOSSES:
            raise ValueError(f"model.comp_loss must be one of {', '.join(COMPATIBLE_LOSSES)}; got {comp_loss!r}")
        self.comp_loss, self.comp_weight, self.temperature = comp_loss, comp_weight, temperature
        self.topk_negatives, self.triplet_margin = topk_negatives, triplet_margin

    @property
    def uses_old_classifier(self) -> bool:
        return self.comp_loss == "bct_ract" or self.influence_weight > 0

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        new = self(images)
        new_target, new_negatives = self.softmax.logit_terms(new, labels)
        loss_cls = self.softmax.loss_from_terms(new_target, new_negatives)
        if self.comp_loss == "bct_ract":  # the new classifier's terms once, for both losses
            loss_comp = bct_ract_loss(self.old_softmax, new, labels, new_negatives)
        else:
            with torch.no_grad():
                old = self.old_model(images)
            # in float32: logits of 1/τ = 100 lose their ranks in bfloat16
            loss_comp = gathered_ract_loss(new.float(), old.float(), labels, self.comp_loss, self.temperature,
                                           self.topk_negatives, self.triplet_margin)
        loss = loss_cls + self.comp_weight * loss_comp
        losses = {"train/loss_cls": loss_cls, "train/loss_ract": loss_comp}
        if self.influence_weight > 0:
            losses["train/loss_influence"] = self.influence_loss(new, batch)
            loss = loss + self.influence_weight * losses["train/loss_influence"]
        size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict(losses, batch_size=size)
        return loss
