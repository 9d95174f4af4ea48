"""What the face-recognition methods share: verification on the insightface ``.bin`` sets
and the SGD recipe.

Validation and test follow insightface ``eval/verification.py``: the embeddings of each image
and of its horizontal flip are summed, gathered from every rank in ``.bin`` order by the
evaluation layer (:mod:`lightning_modules.base`), and scored with the 10-fold accuracy of every
pair set (``val/<set>_acc``, ``val/acc`` their mean;
:class:`~benchmarks.metrics.face.VerificationAccuracy`). A method provides
``forward(images) -> embeddings``.

Optimisation (arcface_torch ``configs/base.py``): SGD with momentum, weight decay except on
BatchNorm, PReLU and biases, linear warm-up, then a polynomial (power 2) decay or steps. The
SGD is torch's fused implementation: weight decay, momentum and update in one pass over each
parameter, which matters for millions of class centres. The subclass's ``hparams`` carry
``lr``, ``momentum``, ``weight_decay``, ``warmup_epochs``, ``lr_schedule``, ``lr_milestones``
and ``lr_gamma``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.metrics.base import BenchmarkMetric
from benchmarks.metrics.face import VerificationAccuracy
from lightning_modules.base import EvaluatedModule, Stage


def warmup_then_decay(
    step: int, warmup_steps: int, total_steps: int, schedule: str, milestones: tuple[int, ...], gamma: float, steps_per_epoch: float
) -> float:
    """LR factor per optimizer step: linear warm-up, then polynomial (power 2) decay to 0 or steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "polynomial":
        return (1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps)) ** 2
    epoch = step / steps_per_epoch
    return gamma ** sum(epoch >= m for m in milestones)


class FaceRecognitionModule(EvaluatedModule):
    """Base of the face methods: verification evaluation and the SGD recipe (module docstring)."""

    # ----------------------------------------------------------------------------- evaluation

    def flip_sum_embeddings(self, batch: dict) -> Tensor:
        """Embeddings of the images plus those of their flips (insightface: sum, then normalise)."""
        return (self(batch["image"]) + self(batch["flipped"])).float()

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        return [VerificationAccuracy()]

    def evaluation_outputs(self, batch: dict) -> dict[str, Tensor]:
        return {"embedding": self.flip_sum_embeddings(batch)}

    # ------------------------------------------------------------------------- optimisation

    def _parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(with weight decay, without): no decay on BatchNorm, PReLU and biases."""
        decay, no_decay = [], []
        for module in self.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.requires_grad:
                    normalisation = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.LayerNorm))
                    (no_decay if normalisation or name == "bias" else decay).append(parameter)
        return decay, no_decay

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = self._parameter_groups()
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, momentum=hp.momentum, fused=True,  # one pass over each parameter and its momentum
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        schedule = functools.partial(
            warmup_then_decay,
            warmup_steps=int(hp.warmup_epochs * steps_per_epoch),
            total_steps=total_steps,
            schedule=hp.lr_schedule,
            milestones=tuple(hp.lr_milestones),
            gamma=hp.lr_gamma,
            steps_per_epoch=steps_per_epoch,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
