"""Preemption: on SIGUSR1 save a checkpoint at a safe point and requeue the SLURM job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def next_hpc_checkpoint(run_dir: Path) -> Path:
    """``hpc_ckpt_<n+1>.ckpt`` in ``run_dir``: the name Lightning resumes from when a SLURM job
    (re)starts and finds ``hpc_ckpt_*.ckpt`` in ``trainer.default_root_dir``."""
    versions = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return run_dir / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt"


class RequeueOnSignal(Callback):
    """On ``SIGUSR1`` (``sbatch --signal=USR1@90``, or ``scancel --signal=USR1 JOBID``): at the
    end of the current training batch, once every rank has agreed, save
    ``hpc_ckpt_<n>.ckpt`` into the run directory, requeue the SLURM job (``scontrol requeue``)
    and stop. The requeued job finds the checkpoint in its stable run directory and resumes.
    Outside SLURM the run saves and stops.

    Lightning's own auto-requeue saves inside the signal handler. Under DDP a rank can be
    signalled in the middle of a collective while another is elsewhere, and the checkpoint's
    barrier then hangs (seen on a 2-task CPU job). Here the handler only sets a flag and the
    ranks agree at a batch boundary (one all-reduce of a boolean per step), so use
    ``SLURMEnvironment(auto_requeue=False)`` with it (``configs/trainer/slurm.yaml`` does).
    """

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        self.signal = signal.Signals[signal_name]
        self._received = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._received = False
            signal.signal(self.signal, self._on_signal)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        path = next_hpc_checkpoint(Path(trainer.default_root_dir))
        rank_zero_info(f"{self.signal.name} received: saving {path} at global step {trainer.global_step}")
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                rank_zero_info(f"requeued SLURM job {job}; it resumes from {path}")
            else:
                rank_zero_warn(f"could not requeue SLURM job {job}: {result.stderr.strip()}; resume with --ckpt_path {path}")
