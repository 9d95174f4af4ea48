"""One optimiser-and-schedule recipe, taken by every trained method as its ``optim`` argument.

A config writes it as a group of the model's arguments::

    model:
      init_args:
        optim:
          lr: 0.1
          lr_batch_size: 256      # lr is given for a global batch of 256 samples
          schedule: cosine
          warmup_epochs: 5

Each method's constructor default is its paper's recipe (the method's docstring says where each
value comes from); a config or ``--model.init_args.optim.<field>`` overrides single fields.

The learning rate follows the linear scaling rule (Goyal et al., "Accurate, Large Minibatch
SGD", 2017): with ``lr_batch_size`` set, ``lr`` and ``min_lr`` are given for that global batch
and scale with the run's (:func:`global_batch_size`); the rate used is logged. The schedule is
:func:`~lightning_modules.nn.schedules.lr_factor`, stepped per optimizer step, or per epoch with
``interval: epoch`` (a recipe whose authors step per epoch).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning import Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_modules.framework import build_train_loader
from lightning_modules.nn.schedules import ScheduleName, lr_factor

NORMALISATION = (nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.LayerNorm, nn.GroupNorm)


def global_batch_size(trainer: Trainer) -> int:
    """Samples per optimizer step over all ranks: per-device batch × devices × nodes × gradient
    accumulation. The per-device batch is the training loader's, else the DataModule's
    ``batch_size``. Call it from ``configure_optimizers`` or later."""
    build_train_loader(trainer)
    loader = trainer.train_dataloader
    per_device = getattr(loader, "batch_size", None) or getattr(trainer.datamodule, "batch_size", None)
    if not per_device:
        raise ValueError(
            "the learning rate scales with the global batch size, but neither the training loader nor the "
            "DataModule has a batch_size"
        )
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


@dataclass(frozen=True)
class OptimizerRecipe:
    """The optimizer, its learning rate and schedule (module docstring).

    ``lr``: peak rate, for a global batch of ``lr_batch_size`` samples (``None``: as given).
    ``optimizer``: SGD (``momentum``, ``nesterov``), Adam or AdamW, torch's fused implementations
    (one pass over each parameter and its state, which matters for millions of class centres),
    or RMSprop (``rmsprop_alpha``, the smoothing constant: torch's 0.99; Keras' ``rho`` is 0.9).
    ``weight_decay``: L2 decay (AdamW: decoupled), not on normalisation layers, PReLU and biases
    when ``decay_norm_and_bias`` is false (insightface). A method's parameter group may carry
    ``lr_scale``: its rate is the run's times that (SegFormer's ×10 head).
    ``schedule``: ``cosine``, ``polynomial`` (``power``) or ``constant`` from the peak down to
    ``min_lr`` (scaled like ``lr``), or ``step``: ×``gamma`` at each of ``milestones`` (epochs).
    Warm-up: linear from ``warmup_start_factor`` × peak over ``warmup_epochs`` epochs or over
    ``warmup_fraction`` of the run (one of the two).
    ``interval``: the schedule moves every optimizer ``step`` or every ``epoch``.
    ``backbone_grad_clip_norm``: the L2 norm of the backbone's gradient is clipped to this before
    each step (arcface_torch's ``clip_grad_norm_(backbone.parameters(), 5)``; after DDP's
    all-reduce and AMP's unscaling); ``None``: no clipping.
    """

    lr: float
    lr_batch_size: int | None = None
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = True
    schedule: ScheduleName = "cosine"
    min_lr: float = 0.0
    power: float = 2.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_fraction: float = 0.0
    warmup_start_factor: float = 0.0
    interval: Literal["step", "epoch"] = "step"
    backbone_grad_clip_norm: float | None = None
    rmsprop_alpha: float = 0.99

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))  # a list where read from YAML
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.lr_batch_size is not None and self.lr_batch_size < 1:
            problems.append(f"lr_batch_size must be a positive batch size or null, got {self.lr_batch_size}")
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_epochs < 0 or not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_epochs must be >= 0 and warmup_fraction in [0, 1), got {self.warmup_epochs} "
                            f"and {self.warmup_fraction}")
        if self.warmup_epochs and self.warmup_fraction:
            problems.append("give the warm-up as warmup_epochs or as warmup_fraction, not both")
        if not 0 <= self.warmup_start_factor <= 1:
            problems.append(f"warmup_start_factor must be in [0, 1], got {self.warmup_start_factor}")
        if list(self.milestones) != sorted(self.milestones):
            problems.append(f"milestones must be increasing epochs, got {list(self.milestones)}")
        if self.milestones and self.schedule != "step":
            problems.append(f"milestones are for schedule: step, not {self.schedule}")
        if self.optimizer not in ("sgd", "adam", "adamw", "rmsprop"):
            problems.append(f"optimizer must be sgd, adam, adamw or rmsprop, got {self.optimizer!r}")
        if self.weight_decay < 0 or self.momentum < 0:
            problems.append(f"weight_decay and momentum must be >= 0, got {self.weight_decay} and {self.momentum}")
        if self.backbone_grad_clip_norm is not None and not self.backbone_grad_clip_norm > 0:
            problems.append(f"backbone_grad_clip_norm must be positive or null, got {self.backbone_grad_clip_norm}")
        if problems:
            raise ValueError("model.init_args.optim: " + "; ".join(problems))

    # ------------------------------------------------------------------------------ parameters

    def parameter_groups(self, module: nn.Module, exclude: Iterable[nn.Parameter] = ()) -> list[dict[str, Any]]:
        """The trainable parameters of ``module`` (less ``exclude``) in module order: one group,
        or with ``decay_norm_and_bias`` false, (decayed, not decayed). The order does not depend
        on the world size, so optimizer state slots are stable across resumes."""
        excluded = {id(p) for p in exclude}
        decay, no_decay = [], []
        for submodule in module.modules():
            for name, parameter in submodule.named_parameters(recurse=False):
                if parameter.requires_grad and id(parameter) not in excluded:
                    exempt = isinstance(submodule, NORMALISATION) or name == "bias"
                    (no_decay if exempt and not self.decay_norm_and_bias else decay).append(parameter)
        if self.decay_norm_and_bias:
            return [{"params": decay, "weight_decay": self.weight_decay}]
        return [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------------------ for Lightning

    def scale(self, trainer: Trainer, method: str) -> float:
        """The factor of the linear scaling rule for this run (1 without ``lr_batch_size``)."""
        if self.lr_batch_size is None:
            return 1.0
        global_batch = global_batch_size(trainer)
        rank_zero_info(f"{method}: lr {self.lr * global_batch / self.lr_batch_size:g} = {self.lr:g} x global batch "
                       f"{global_batch} / {self.lr_batch_size}")
        return global_batch / self.lr_batch_size

    def configure(self, trainer: Trainer, groups: list[dict[str, Any]], method: str) -> dict[str, Any]:
        """``configure_optimizers``' answer: the optimizer over ``groups`` and its LambdaLR."""
        lr = self.lr * self.scale(trainer, method)
        for group in groups:
            if "lr_scale" in group:
                group["lr"] = lr * group.pop("lr_scale")
        if self.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=self.momentum, nesterov=self.nesterov, fused=True)
        elif self.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, lr=lr, fused=True)
        elif self.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
        else:
            optimizer = torch.optim.RMSprop(groups, lr=lr, alpha=self.rmsprop_alpha)
        epochs = max(1, trainer.max_epochs or 1)
        total = epochs if self.interval == "epoch" else int(trainer.estimated_stepping_batches)
        per_epoch = total / epochs
        factor = functools.partial(
            lr_factor,
            schedule=self.schedule,
            warmup_steps=self.warmup_epochs * per_epoch if self.warmup_epochs else self.warmup_fraction * total,
            total_steps=total,
            start_factor=self.warmup_start_factor,
            end_factor=self.min_lr / self.lr,
            milestones=tuple(m * per_epoch for m in self.milestones),
            gamma=self.gamma,
            power=self.power,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


# Checkpoints keep the recipe in their hyperparameters and are read with weights_only=True.
torch.serialization.add_safe_globals([OptimizerRecipe])
