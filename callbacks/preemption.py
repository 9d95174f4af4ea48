"""Stopping on a signal without losing the run: save a checkpoint at a safe point, then stop
(and on SIGUSR1 requeue the SLURM job)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.framework import mark_step_checkpointed


def next_hpc_checkpoint(run_dir: Path) -> Path:
    """``hpc_ckpt_<n+1>.ckpt`` in ``run_dir``: the name Lightning resumes from when a SLURM job
    (re)starts and finds ``hpc_ckpt_*.ckpt`` in ``trainer.default_root_dir``."""
    versions = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return run_dir / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt"


class CheckpointOnSignal(Callback):
    """On ``SIGUSR1``, ``SIGTERM`` or ``SIGINT`` during ``fit``: at the end of the current
    training batch, once every rank has agreed, save ``hpc_ckpt_<n>.ckpt`` into the run
    directory and stop.

    - ``SIGUSR1`` (``sbatch --signal=USR1@90``, ``scancel --signal=USR1 JOBID``): preemption;
      the SLURM job is requeued (``scontrol requeue``) and finds the checkpoint in its stable run
      directory; ``visionzoo`` exits 0. Outside SLURM the run saves and stops.
    - ``SIGTERM`` (``scancel``, ``kill``, most schedulers) and ``SIGINT`` (Ctrl+C): ``visionzoo``
      exits with 128 + the signal's number and a line naming the checkpoint, so ``fit && test``
      does not carry on. A second ``SIGINT`` interrupts at once.

    Lightning's own handlers save inside the signal handler (auto-requeue), which can hang DDP
    when a rank is signalled in the middle of a collective, or stop on SIGTERM without a
    checkpoint and with exit status 0. Here the handler only records the signal and the ranks
    agree at a batch boundary (one all-reduce per step); the handlers are installed when
    training starts, after Lightning's (so use ``SLURMEnvironment(auto_requeue=False)``, as
    ``configs/trainer/slurm.yaml`` does), and the previous ones are put back at teardown.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._received = 0
        self._previous: dict[signal.Signals, Any] = {}
        self.stopped_by: signal.Signals | None = None
        self.checkpoint: Path | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl+C: now
        self._received = self._received or signum

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._received, self.stopped_by, self.checkpoint = 0, None, None
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:  # not replaced since (Lightning restores its own)
                signal.signal(signum, previous)
        self._previous = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        received = int(trainer.strategy.reduce(torch.tensor(self._received, device=pl_module.device), reduce_op="max"))
        if not received:
            return
        self.stopped_by = signal.Signals(received)
        self.checkpoint = next_hpc_checkpoint(Path(trainer.default_root_dir))
        rank_zero_info(f"{self.stopped_by.name} received: saving {self.checkpoint} at global step {trainer.global_step}")
        trainer.save_checkpoint(self.checkpoint)
        mark_step_checkpointed(trainer, str(self.checkpoint))  # no last.ckpt after it, at the stopped epoch's end
        trainer.should_stop = True
        job = os.environ.get("SLURM_JOB_ID")
        if self.stopped_by == signal.SIGUSR1 and trainer.is_global_zero and job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                rank_zero_info(f"requeued SLURM job {job}; it resumes from {self.checkpoint}")
            else:
                rank_zero_warn(f"could not requeue SLURM job {job}: {result.stderr.strip()}; resume with "
                               f"--ckpt_path {self.checkpoint}")

    def exit_status(self) -> int:
        """0, or 128 + the signal that stopped training (SIGTERM, SIGINT)."""
        return 128 + self.stopped_by if self.stopped_by in (signal.SIGTERM, signal.SIGINT) else 0
