"""What the face-recognition methods share: verification on the insightface ``.bin`` sets
and the SGD recipe.

Validation and test follow insightface ``eval/verification.py``: the embeddings of each image
and of its horizontal flip are summed, gathered from every rank in ``.bin`` order, and scored
with the 10-fold accuracy of every pair set (``val/<set>_acc``, ``val/acc`` their mean). A
method provides ``forward(images) -> embeddings``.

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

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from benchmarks.metrics.face import verification_accuracy
from lightning_modules.distributed.comm import world_info


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


class FaceRecognitionModule(LightningModule):
    """Base of the face methods: verification evaluation and the SGD recipe (module docstring)."""

    # ----------------------------------------------------------------------------- evaluation

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings = {}

    def flip_sum_embeddings(self, batch: dict) -> Tensor:
        """Embeddings of the images plus those of their flips (insightface: sum, then normalise)."""
        return (self(batch["image"]) + self(batch["flipped"])).float()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_embeddings.setdefault(dataloader_idx, []).append((batch["index"], self.flip_sum_embeddings(batch)))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log_dict(self._verification_metrics("val"), sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._verification_metrics("test"), sync_dist=False)

    def _verification_metrics(self, stage: str) -> dict[str, float]:
        """10-fold accuracy of every verification set, from the embeddings of all ranks."""
        datamodule = self.trainer.datamodule
        metrics = {}
        for dataloader_idx, parts in sorted(self._val_embeddings.items()):
            name = datamodule.val_set_names[dataloader_idx]
            embeddings, seen = self._gathered_by_index(parts)
            issame = datamodule.issame(name)
            complete = seen[0::2] & seen[1::2]
            if not complete.all():
                rank_zero_warn(f"{name}: only {complete.sum()} of {issame.size} pairs were evaluated (limit_*_batches?)")
            accuracy, std = verification_accuracy(embeddings[0::2][complete], embeddings[1::2][complete], issame[complete[: issame.size]])
            metrics[f"{stage}/{name}_acc"] = accuracy
            metrics[f"{stage}/{name}_std"] = std
        accuracies = [v for k, v in metrics.items() if k.endswith("_acc")]
        if accuracies:
            metrics[f"{stage}/acc"] = float(np.mean(accuracies))
        return metrics

    def _gathered_by_index(self, parts: list[tuple[Tensor, Tensor]]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of one set in ``.bin`` order from every rank (the distributed sampler
        pads with repeats, which land on the same index), and which indices were seen."""
        indices = torch.cat([index for index, _ in parts])
        embeddings = torch.cat([embedding for _, embedding in parts])
        if world_info()[1] > 1:
            indices = self.all_gather(indices).flatten()
            embeddings = self.all_gather(embeddings).flatten(0, 1)
        size = int(indices.max()) + 1
        size += size % 2
        ordered = embeddings.new_zeros(size, embeddings.shape[1])
        ordered[indices] = embeddings
        seen = torch.zeros(size, dtype=torch.bool, device=indices.device)
        seen[indices] = True
        return ordered.cpu().numpy(), seen.cpu().numpy()

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
