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
    or infinite, and no non-finite step reaches the weights.

    ``check_every_n_steps`` 1 (the default): the loss is checked before every ``backward``, so
    the optimizer never sees that step; on a GPU the check waits for the device every step.
    With N > 1 nothing waits per step: the check stays on the device, a fused optimizer (the
    recipe's SGD, Adam, AdamW) is told to skip a non-finite step there (its ``found_inf``, as
    ``torch.amp.GradScaler`` does), and the first non-finite step is looked up every N steps
    and before any checkpoint is written, raising then. An optimizer that is not fused is still
    checked every step.

    A run that diverges can write checkpoints before its loss turns NaN (at lr 1e30 the weights
    were ~1e29 a step before). So every checkpoint records, under ``weights_health``, the last
    loss and the largest absolute parameter at saving (one pass over them per checkpoint,
    nothing per step); it is healthy when both are finite and that weight is at most
    ``max_abs_weight``. The error names the newest healthy checkpoint of the run directory, and
    says that its optimizer state and schedule carry the learning rate that diverged.
    """

    def __init__(self, max_abs_weight: float = 1e6, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be at least 1; got {check_every_n_steps}")
        self.max_abs_weight, self.check_every_n_steps = max_abs_weight, check_every_n_steps
        self._last_loss: Tensor | float = math.nan
        self._finite: Tensor | None = None  # this step's loss is finite (deferred checks)
        self._first_non_finite: Tensor | None = None  # the global step of the first non-finite loss, or -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._last_loss = loss.detach()  # read at saving only: no wait on the device here
        if self._first_non_finite is not None and (trainer.global_step % self.check_every_n_steps == 0
                                                   or batch_idx + 1 == trainer.num_training_batches):
            self._raise_if_skipped(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._first_non_finite is not None:
            self._raise_if_skipped(trainer)  # a checkpoint after a skipped step is never written
        parameters = {name for name, _ in pl_module.named_parameters()}  # not buffers: running statistics may be large
        largest = max((float(t.detach().abs().max()) for name, t in checkpoint["state_dict"].items()
                       if name in parameters and t.is_floating_point() and t.numel()), default=0.0)
        last_loss = float(self._last_loss)
        healthy = math.isfinite(last_loss) and math.isfinite(largest) and largest <= self.max_abs_weight
        checkpoint[HEALTH] = {"loss": last_loss, "max_abs_weight": largest, "healthy": healthy}

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self.check_every_n_steps == 1:
            if not loss.isfinite().all():
                self._raise(trainer, f"training loss is {loss.item()} at epoch {trainer.current_epoch}, global step "
                                     f"{trainer.global_step} (batch {trainer.fit_loop.epoch_loop.batch_idx}); stopped "
                                     "before the optimizer step.")
            return
        self._finite = loss.detach().isfinite().all()
        if self._first_non_finite is None:
            self._first_non_finite = torch.full((), -1, dtype=torch.long, device=loss.device)
        step = torch.full_like(self._first_non_finite, trainer.global_step)
        self._first_non_finite = torch.where(self._finite | (self._first_non_finite >= 0), self._first_non_finite, step)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._finite is None:
            return
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = (~self._finite).float()  # the fused step is skipped on the device when 1
        elif not self._finite:
            self._raise_if_skipped(trainer)

    def _raise_if_skipped(self, trainer: Trainer) -> None:
        first = int(self._first_non_finite)
        if first >= 0:
            self._raise(trainer, f"training loss was non-finite at global step {first} (checked every "
                                 f"{self.check_every_n_steps} steps; stopped at step {trainer.global_step}, epoch "
                                 f"{trainer.current_epoch}); that step and every non-finite one after it were skipped "
                                 "by the optimizer, so none reached the weights.")

    def _raise(self, trainer: Trainer, what: str) -> None:
        raise NonFiniteLossError(f"{what} {self._resume_advice(trainer)}")

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
