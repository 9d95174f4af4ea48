"""What an exact resume needs beyond Lightning's own checkpoint contents.

Lightning restores weights, optimizer, LR schedulers, loop counters and (for a
``StatefulDataLoader``, :mod:`datamodules.resumable`) the data position. It does not store the
global random number generators, so dropout masks and sampled classes after a resume would
differ from an uninterrupted run, and rows that a killed run logged after its last checkpoint
would appear twice in ``metrics.csv``; and its restore of the data position misses cases
(:func:`lightning_modules.framework.restore_train_position`). :class:`ResumeState` handles all three.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.framework import logged_step, restore_train_position


def rng_states() -> dict[str, Any]:
    """This process's global RNG states: torch (CPU and every CUDA device), numpy, python; as
    tensors and plain Python values, which ``torch.load(weights_only=True)`` accepts."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(states["python"])


def drop_rows_from(metrics_csv: Path, step: int) -> int:
    """Remove the rows of ``metrics_csv`` whose ``step`` is ``step`` or later (written by a run
    after the checkpoint it is resumed from); returns how many. Atomic rewrite."""
    if not metrics_csv.is_file():
        return 0
    with open(metrics_csv, newline="") as file:
        reader = csv.DictReader(file)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
    if len(kept) < len(rows):
        partial = metrics_csv.with_name(f".{metrics_csv.name}.{os.getpid()}.partial")
        with open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(partial, metrics_csv)
    return len(rows) - len(kept)


class ResumeState(Callback):
    """Stores every rank's global RNG states and the run's seed in each checkpoint and flushes
    the loggers; on resume, restores this rank's states when training starts (after any sanity
    check, which draws random numbers) and, at the first training batch, drops the
    ``metrics.csv`` rows from the step that batch will be logged at on (rows the interrupted run
    wrote after its checkpoint). That step is Lightning's own count once its loop has restarted:
    it depends on where the checkpoint was written (after a batch, or after the epoch's
    validation), which the checkpoint's own count does not tell.

    RNG states are gathered from all ranks when saving (every rank runs the checkpoint hooks);
    a checkpoint resumed on a different world size restores ``rank % saved ranks``, which is
    deterministic but no longer the continuation of the original run.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._loader_states: list[dict[str, Any]] | None = None
        self._epoch = 0
        self._drop_rows_pending = False

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
        else:
            gathered = [states]
        checkpoint["resume_state"] = {
            "rng_states": gathered,
            "seed": os.environ.get("PL_GLOBAL_SEED"),
        }
        for logger in trainer.loggers:  # rows up to the checkpoint survive a kill right after it
            logger.save()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._loader_states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
        self._epoch = checkpoint.get("epoch", 0)
        self._to_restore = checkpoint.get("resume_state")
        if self._to_restore is None:
            rank_zero_warn("the checkpoint has no RNG states (not written by visionzoo): the resumed run is not exact")
            return
        seed = os.environ.get("PL_GLOBAL_SEED")
        if self._to_restore["seed"] != seed:
            rank_zero_warn(
                f"the checkpoint's run used seed_everything={self._to_restore['seed']}, this run uses {seed}: "
                "the data order of later epochs will differ from the original run's"
            )
        saved_ranks = len(self._to_restore["rng_states"])
        if saved_ranks != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint was saved by {saved_ranks} ranks and resumes on {trainer.world_size}: "
                "its random streams are reused, but the run is not the continuation of the original one"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_data_position(trainer)
        if self._to_restore is None:
            return
        saved = self._to_restore["rng_states"]
        set_rng_states(saved[trainer.global_rank % len(saved)])
        self._drop_rows_pending = True
        self._to_restore = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._drop_rows_pending:
            return
        self._drop_rows_pending = False
        log_dir = trainer.log_dir  # a collective: every rank asks
        if trainer.is_global_zero and log_dir:
            dropped = drop_rows_from(Path(log_dir) / "metrics.csv", logged_step(trainer))
            if dropped:
                rank_zero_info(f"metrics.csv: dropped {dropped} rows logged after the checkpoint")

    def _restore_data_position(self, trainer: Trainer) -> None:
        """The train loaders at the checkpoint's position, with its epoch's order
        (:func:`lightning_modules.framework.restore_train_position`)."""
        states, self._loader_states = self._loader_states, None
        restore_train_position(trainer, states, self._epoch)


class LastCheckpointEvery(ModelCheckpoint):
    """Writes ``<run dir>/checkpoints/last.ckpt`` every ``steps`` optimizer steps, whatever the
    validation schedule: Lightning's default ModelCheckpoint saves after validation only, so a
    run that validates every few epochs lost everything before its first validation when
    interrupted. ``visionzoo --checkpoint_every_n_steps N`` (a config key too; 0 turns it off).
    A ModelCheckpoint, so that Lightning runs it after every other callback of the batch, whose
    states the checkpoint must hold as they are at the end of the step."""

    def __init__(self, steps: int) -> None:
        if steps < 0:
            raise ValueError(f"checkpoint_every_n_steps must be >= 0 (0: off), got {steps}")
        super().__init__(every_n_train_steps=steps or None, save_top_k=0, save_last=bool(steps),
                         enable_version_counter=False)


class RestartLearningRateSchedule(Callback):
    """``visionzoo fit --ckpt_path ... --restart_lr_schedule true``: resume the weights, the
    optimizer's momentum and the data position, but not the learning-rate schedule, which starts
    again from its first step with the config's recipe (a checkpoint's optimizer state and
    schedule carry the learning rate it was trained with, so a resume would otherwise continue
    with the rate that, say, diverged). The resumed run is then not exact."""

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Loaded into the recipe's LambdaLR, a state of only its (unset) lambdas changes nothing:
        # the schedulers keep the rates the config's recipe gave them, from its first step.
        checkpoint["lr_schedulers"] = [{"lr_lambdas": [None] * len(state.get("lr_lambdas", []))}
                                       for state in checkpoint.get("lr_schedulers", [])]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The optimizer's groups were restored with the checkpoint's rates: set the recipe's."""
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
        rank_zero_info("restart_lr_schedule: the learning-rate schedule starts again from the config's recipe")
