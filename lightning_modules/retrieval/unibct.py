"""UniBCT: Universal Backward-Compatible Training (Zhang et al., IJCAI 2022, arXiv 2203.01583;
method card 9 of ``face_and_retrieval.md``). No authors' code is public; the compatibility loss
follows AdvBCT's reimplementation (Ashespt/AdvBCT ``trainer.py``, ``uni_bct``), the prototype
refinement is a reconstruction.

1. Old prototypes: the frozen old model (``old_checkpoint``) embeds the *new* training set once
   (test-time transform, each rank a share); a class's prototype is the normalised mean of its
   old features, for every new class (also those the old model never saw). Cached in the run
   directory (``bct_class_means.pt``).
2. Structural prototype refinement (``prototype_refinement``, UNVERIFIED reconstruction of the
   paper's): one propagation step over the prototypes' kNN graph, each prototype the
   softmax(cosine/``refinement_temperature``)-weighted mean of itself and its
   ``refinement_neighbours`` nearest (:func:`~lightning_modules.nn.compatibility.refine_prototypes`).
3. L = L_cls + λ·ArcFace(normalize(φ_new(x)), prototypes, y), s and m the new head's (30, 0.3 as
   AdvBCT's ``LOSS.SCALE``/``MARGIN``), the prototypes frozen, sharded over the ranks like the
   classifier (BCT's machinery, :class:`~lightning_modules.retrieval.bct.BackwardCompatibleTraining`).

Deviations from the authors' code: AdvBCT's reimplementation takes its prototypes from the old
training set's statistics and constrains only the old classes; here (as the card's minimal
build) they come from the new training set for every class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_modules.nn.compatibility import refine_prototypes
from lightning_modules.retrieval.bct import BackwardCompatibleTraining


class UniversalBackwardCompatibleTraining(BackwardCompatibleTraining):
    """UniBCT (module docstring). Takes BCT's arguments (``influence_weight`` is λ, ``old_head``
    margin); ``prototype_refinement`` on by default, ``refinement_neighbours`` 5 and
    ``refinement_temperature`` 0.1 (UNVERIFIED)."""

    method_name = "unibct"

    def __init__(self, *args: Any, prototype_refinement: bool = True, refinement_neighbours: int = 5,
                 refinement_temperature: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prototype_refinement = prototype_refinement
        self.refinement_neighbours, self.refinement_temperature = refinement_neighbours, refinement_temperature

    def old_classifier_rows(self, start: int, end: int) -> Tensor:
        """Rows ``start``..``end`` of every class's (refined) old prototypes."""
        num_classes = len(self.trainer.datamodule.landmark_ids)
        means = self.new_class_means(list(range(num_classes)))
        prototypes = torch.stack([means[c] for c in range(num_classes)])
        if self.prototype_refinement:
            prototypes = refine_prototypes(prototypes, self.refinement_neighbours, self.refinement_temperature)
        return prototypes[start:end]
