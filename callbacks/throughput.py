"""Throughput, step time and ETA: logged into ``metrics.csv`` and, where no progress bar is
drawn (SLURM ``.out`` files, CI logs), printed as plain lines."""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


def batch_size_of(batch: Any) -> int:
    """Number of samples in a dict batch (the first tensor field's leading size)."""
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class Throughput(Callback):
    """Every ``every_n_steps`` training batches (default: ``trainer.log_every_n_steps``) and at
    the end of each epoch: samples/s (over all ranks), mean step time and the ETA of the fit,
    written to the loggers as ``throughput/*``; printed when ``print_lines`` (default: when
    standard output is not a terminal), together with test progress and validation results."""

    def __init__(self, every_n_steps: int | None = None, print_lines: bool | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.print_lines = (not sys.stdout.isatty()) if print_lines is None else print_lines
        self._window_start: float | None = None
        self._window_samples = 0
        self._window_steps = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.every_n_steps is None:
            self.every_n_steps = trainer.log_every_n_steps

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Also here: a fit resumed mid-epoch does not call on_train_epoch_start.
        self._window_start, self._window_samples, self._window_steps = time.perf_counter(), 0, 0

    on_train_epoch_start = on_train_start

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._window_samples += batch_size_of(batch) * trainer.world_size
        self._window_steps += 1
        if self._window_steps < self.every_n_steps and batch_idx + 1 != trainer.num_training_batches:
            return
        elapsed = time.perf_counter() - self._window_start
        step_time = elapsed / self._window_steps
        samples_per_second = self._window_samples / elapsed
        remaining_steps = trainer.estimated_stepping_batches - trainer.global_step
        eta = remaining_steps * step_time * trainer.accumulate_grad_batches
        metrics = {"throughput/samples_per_sec": samples_per_second, "throughput/step_time_sec": step_time}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.print_lines:
            loss = trainer.callback_metrics.get("train/loss")
            loss_text = f" loss {float(loss):.4g}" if loss is not None else ""
            # epochs as the Rich bar and metrics.csv count them; a fit bounded by max_steps alone has max_epochs -1
            epochs = f"/{trainer.max_epochs - 1}" if trainer.max_epochs is not None and trainer.max_epochs > 0 else ""
            rank_zero_info(
                f"epoch {trainer.current_epoch}{epochs} "
                f"batch {batch_idx + 1}/{trainer.num_training_batches} step {trainer.global_step}{loss_text} "
                f"| {samples_per_second:.1f} samples/s, {step_time * 1000:.0f} ms/step | ETA {_format_duration(eta)}"
            )
        self._window_start, self._window_samples, self._window_steps = time.perf_counter(), 0, 0

    def _print_evaluation_progress(self, trainer: Trainer, stage: str, batch_idx: int, total: int | float) -> None:
        if self.print_lines and ((batch_idx + 1) % self.every_n_steps == 0 or batch_idx + 1 == total):
            rank_zero_info(f"{stage} batch {batch_idx + 1}/{total}")

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._print_evaluation_progress(trainer, "test", batch_idx, trainer.num_test_batches[dataloader_idx])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.print_lines and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            if metrics:
                rank_zero_info(f"epoch {trainer.current_epoch} validation: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
