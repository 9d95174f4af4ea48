"""The global batch size of a training run, for the linear learning-rate scaling rules of the
recipes (Goyal et al., "Accurate, Large Minibatch SGD", 2017: lr proportional to the batch)."""

from __future__ import annotations

from lightning import Trainer
from lightning.pytorch.utilities import rank_zero_info


def global_batch_size(trainer: Trainer) -> int:
    """Samples per optimizer step over all ranks: per-device batch × devices × nodes × gradient
    accumulation. The per-device batch is the training loader's, else the DataModule's
    ``batch_size``. Call it from ``configure_optimizers`` or later."""
    if trainer.train_dataloader is None:
        # Trainer.estimated_stepping_batches loads it the same way, but not when max_epochs is -1.
        trainer.fit_loop.setup_data()
    loader = trainer.train_dataloader
    per_device = getattr(loader, "batch_size", None) or getattr(trainer.datamodule, "batch_size", None)
    if not per_device:
        raise ValueError(
            "the learning rate scales with the global batch size, but neither the training loader nor the "
            "DataModule has a batch_size"
        )
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


def scaled_lr(trainer: Trainer, lr: float, lr_batch_size: int | None, method: str) -> float:
    """The linear scaling rule: ``lr`` is given for a global batch of ``lr_batch_size`` samples and
    scales with the run's global batch (:func:`global_batch_size`); ``None`` uses ``lr`` as given.
    The rate used is logged with how it was derived."""
    if lr_batch_size is None:
        return lr
    if lr_batch_size < 1:
        raise ValueError(f"the learning rate's batch size (lr_batch_size) must be positive or null, got {lr_batch_size}")
    global_batch = global_batch_size(trainer)
    scaled = lr * global_batch / lr_batch_size
    rank_zero_info(f"{method}: lr {scaled:g} = {lr:g} x global batch {global_batch} / {lr_batch_size}")
    return scaled
