"""What the face-recognition methods share: verification on the insightface ``.bin`` sets
and the SGD recipe.

Validation and test follow insightface ``eval/verification.py``: the embeddings of each image
and of its horizontal flip are summed, gathered from every rank in ``.bin`` order by the
evaluation layer (:mod:`lightning_modules.base`), and scored with the 10-fold accuracy of every
pair set (``val/<set>_acc``, ``val/acc`` their mean;
:class:`~benchmarks.metrics.face.VerificationAccuracy`). A method provides
``forward(images) -> embeddings``.

Optimisation: the face methods' recipes (``optim``,
:class:`~lightning_modules.recipe.OptimizerRecipe`) are arcface_torch's ``configs/base.py``
form: SGD with momentum, weight decay except on BatchNorm, PReLU and biases
(``decay_norm_and_bias: false``), a linear warm-up from 0, then a polynomial (power 2) decay or
steps at epoch milestones.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from benchmarks.metrics.base import BenchmarkMetric
from benchmarks.metrics.face import VerificationAccuracy
from lightning_modules.base import EvaluatedModule, Stage


class FaceRecognitionModule(EvaluatedModule):
    """Base of the face methods: verification evaluation (module docstring)."""

    # ----------------------------------------------------------------------------- evaluation

    def flip_sum_embeddings(self, batch: dict) -> Tensor:
        """Embeddings of the images plus those of their flips (insightface: sum, then normalise)."""
        return (self(batch["image"]) + self(batch["flipped"])).float()

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        return [VerificationAccuracy()]

    def evaluation_outputs(self, batch: dict) -> dict[str, Tensor]:
        return {"embedding": self.flip_sum_embeddings(batch)}

    def prediction_outputs(self, batch: dict) -> dict[str, Tensor]:
        """``visionzoo predict``: the L2-normalised flip-sum embedding, compared by dot product."""
        return {"embedding": F.normalize(self.flip_sum_embeddings(batch), dim=1)}
