"""Face recognition as million-way classification with a margin softmax (ArcFace, CosFace,
combined margin, CurricularFace, NPCFace, Search-Softmax's loss), the class centres sharded
over all ranks (the model-parallel softmax of insightface's ``arcface_torch``).

1. A backbone (iResNet-50/100 of ArcFace, or any timm model) maps an aligned 112x112 face to
   a 512-d embedding.
2. A margin head turns the cosines between normalised embeddings and normalised class
   centres into logits: the margin acts on the target class only.
3. The centres live in :class:`~lightning_modules.distributed.model_parallel_softmax.ModelParallelSoftmax`:
   each rank owns a contiguous slice, embeddings are all-gathered, and the loss equals the
   single-device softmax. The centres are kept out of DDP's gradient all-reduce, and a
   checkpoint holds them whole, so that it resumes on any number of ranks.
4. Validation follows insightface ``eval/verification.py``: embeddings of the image and of its
   horizontal flip are summed, then the 10-fold accuracy of each ``.bin`` pair set.

Recipe defaults (arcface_torch ``configs/base.py``, the method cards): SGD, momentum 0.9, weight
decay 5e-4 (none on BatchNorm, biases and PReLU), lr 0.1, 2 warm-up epochs then a polynomial
(power 2) decay. The polynomial decay is UNVERIFIED for the papers; ``lr_schedule: step`` with
``lr_milestones`` gives the older step schedules (CurricularFace: x0.1 at 10, 18, 22).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.metrics.face import verification_accuracy
from lightning_modules.distributed.comm import world_info
from lightning_modules.distributed.model_parallel_softmax import ModelParallelSoftmax, gather_full_weight, shard_of
from lightning_modules.nn.backbones import create_embedding_backbone
from lightning_modules.nn.margins import CombinedMarginHead, MarginHead

CENTRES_KEY = "softmax.weight"


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


class MarginSoftmaxRecognizer(LightningModule):
    """Backbone + margin head over model-parallel class centres (see the module docstring)."""

    def __init__(
        self,
        num_classes: int,
        head: MarginHead | None = None,
        backbone: str = "iresnet50",
        embedding_size: int = 512,
        dropout: float = 0.0,
        pretrained: bool = False,
        weights: str | None = None,
        sample_rate: float = 1.0,
        knn_neighbours: int = 0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 2.0,
        lr_schedule: Literal["polynomial", "step"] = "polynomial",
        lr_milestones: tuple[int, ...] = (),
        lr_gamma: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["head"])
        self.head = head if head is not None else CombinedMarginHead()
        self.backbone = create_embedding_backbone(backbone, embedding_size, pretrained, weights, dropout)
        self.softmax: ModelParallelSoftmax | None = None  # built in configure_model: needs the process group
        self._val_embeddings: dict[int, list[tuple[Tensor, Tensor]]] = {}

    @property
    def method_name(self) -> str:
        return self.head.name

    def configure_model(self) -> None:
        """Build this rank's shard of the class centres and keep it out of DDP's all-reduce."""
        if self.softmax is not None:
            return
        hp = self.hparams
        self.softmax = ModelParallelSoftmax(hp.num_classes, hp.embedding_size, self.head, hp.sample_rate, hp.knn_neighbours, hp.seed)
        ignored = [f"softmax.{name}" for name in self.softmax.model_parallel_parameter_names()]
        ignored += [f"softmax.head.{name}" for name, _ in self.head.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)

    def forward(self, images: Tensor) -> Tensor:
        """Unnormalised embeddings [B, D]."""
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.softmax(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # ----------------------------------------------------------------------------- evaluation

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings = {}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        embeddings = self(batch["image"]) + self(batch["flipped"])  # insightface: sum, then normalise
        self._val_embeddings.setdefault(dataloader_idx, []).append((batch["index"], embeddings.float()))

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
            lr=hp.lr, momentum=hp.momentum,
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

    # ------------------------------------------------------------- checkpoints across world sizes

    def _reshard_centres(self, checkpoint: dict[str, Any], transform) -> None:
        """Apply ``transform`` to the centres and to their optimizer state in a checkpoint.

        The optimizer numbers parameters as ``configure_optimizers`` orders them, which does
        not depend on the world size. ``optimizer.state_dict()`` shares its per-parameter
        dicts with the live optimizer, so entries are replaced, never modified in place.
        """
        checkpoint["state_dict"][CENTRES_KEY] = transform(checkpoint["state_dict"][CENTRES_KEY])
        decay, no_decay = self._parameter_groups()
        slot = next(i for i, p in enumerate(decay + no_decay) if p is self.softmax.weight)
        for optimizer in checkpoint.get("optimizer_states", []):
            state = optimizer["state"].get(slot)
            if state and "momentum_buffer" in state:
                optimizer["state"][slot] = {**state, "momentum_buffer": transform(state["momentum_buffer"])}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the centres and their momentum whole (a collective: every rank saves)."""
        self._reshard_centres(checkpoint, lambda shard: gather_full_weight(shard.detach()).cpu())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Slice the whole centres and momentum for this rank, whatever the saving world size."""
        self.configure_model()
        rank, world_size = world_info()
        self._reshard_centres(checkpoint, lambda full: shard_of(full, rank, world_size))
