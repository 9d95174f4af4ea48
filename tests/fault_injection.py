"""Callbacks that inject faults into a ``visionzoo fit`` run, for the resume and fault tests.
Used from a test's extra config as ``class_path: tests.fault_injection.<Name>`` (the tests put
the repository root on ``PYTHONPATH``)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from lightning import Callback, LightningModule, Trainer


class SignalAtStep(Callback):
    """Sends ``signal_name`` to this process on rank ``rank`` when ``global_step`` optimizer
    steps are done: at the start of the next training batch, after every callback of the
    previous one (Lightning runs checkpoint callbacks last) has written its checkpoint."""

    def __init__(self, global_step: int, signal_name: str = "SIGKILL", rank: int = 0) -> None:
        self.global_step = global_step
        self.signal = signal.Signals[signal_name]
        self.rank = rank

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.global_step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signal)
            time.sleep(1)  # let a handled signal (SIGUSR1) land before this batch ends
