"""Stop at the first non-finite loss, before it reaches the weights."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(Callback):
    """Raises :class:`NonFiniteLossError` naming the epoch, step and batch when the loss is NaN
    or infinite. It runs before ``backward``, so the optimizer never applies that step and the
    checkpoints already written (``last.ckpt`` included) keep the last good weights."""

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if not loss.isfinite().all():
            checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {trainer.current_epoch}, global step "
                f"{trainer.global_step} (batch {trainer.fit_loop.epoch_loop.batch_idx}); stopped before "
                f"the optimizer step. Last good checkpoint: {checkpoint}"
            )
