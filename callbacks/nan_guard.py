"""Stop at the first non-finite loss, before it reaches the weights, and name the last
checkpoint that is worth resuming."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

HEALTH = "weights_health"  # the checkpoint key of what FiniteLossGuard found at saving


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(Callback):
    """Raises :class:`NonFiniteLossError` naming the epoch, step and batch when the loss is NaN
    or infinite. It runs before ``backward``, so the optimizer never applies that step.

    A run that diverges can write checkpoints before its loss turns NaN (at lr 1e30 the weights
    were ~1e29 a step before). So every checkpoint records, under ``weights_health``, the last
    loss and the largest absolute parameter at saving (one pass over them per checkpoint,
    nothing per step); it is healthy when both are finite and that weight is at most
    ``max_abs_weight``. The error names the newest healthy checkpoint of the run directory, and
    says that its optimizer state and schedule carry the learning rate that diverged.
    """

    def __init__(self, max_abs_weight: float = 1e6) -> None:
        self.max_abs_weight = max_abs_weight
        self._last_loss = math.nan

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._last_loss = float(loss.detach())

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        parameters = {name for name, _ in pl_module.named_parameters()}  # not buffers: running statistics may be large
        largest = max((float(t.detach().abs().max()) for name, t in checkpoint["state_dict"].items()
                       if name in parameters and t.is_floating_point() and t.numel()), default=0.0)
        healthy = math.isfinite(self._last_loss) and math.isfinite(largest) and largest <= self.max_abs_weight
        checkpoint[HEALTH] = {"loss": self._last_loss, "max_abs_weight": largest, "healthy": healthy}

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if not loss.isfinite().all():
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {trainer.current_epoch}, global step "
                f"{trainer.global_step} (batch {trainer.fit_loop.epoch_loop.batch_idx}); stopped before "
                f"the optimizer step. {self._resume_advice(trainer)}"
            )

    def _resume_advice(self, trainer: Trainer) -> str:
        run_dir = Path(trainer.default_root_dir)
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or run_dir / "checkpoints"
        healthy, poisoned = [], []
        for path in sorted([*Path(folder).glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")],
                           key=lambda p: p.stat().st_mtime, reverse=True):
            health = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(HEALTH)
            (healthy if health and health["healthy"] else poisoned).append((path, health))
        found = []
        if poisoned:
            found.append("diverged before the loss turned NaN, not worth resuming: " + ", ".join(
                f"{path} (loss {h['loss']:.3g}, largest weight {h['max_abs_weight']:.3g})" if h else f"{path} (not checked)"
                for path, h in poisoned))
        if healthy:
            path, health = healthy[0]
            found.append(f"last healthy checkpoint: {path} (loss {health['loss']:.4g}, largest weight "
                         f"{health['max_abs_weight']:.3g}). Its optimizer state and learning-rate schedule carry the "
                         "rate that diverged: resume it with a lower --model.init_args.optim.lr and --restart_lr_schedule true")
        else:
            found.append("no healthy checkpoint")
        return "Checkpoints: " + "; ".join(found) + "."
