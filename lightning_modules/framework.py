"""Every place where visionzoo reaches into Lightning, torchdata or torch internals.

Checked against lightning 2.6.6, torchdata 0.11.0 and torch 2.14.1, the versions
``pyproject.toml`` pins; ``tests/test_framework_internals.py`` fails when one of the internals
below changes. Callers use the functions here, never the internals themselves. What each
concern touches:

- **DDP's ignore list** (:func:`keep_out_of_ddp`): torch's
  ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``, which Lightning's DDP
  strategy honours, for parameters each rank owns (model-parallel class centres, Search-Softmax
  workers) and buffers that are equal on every rank by construction (queues).
- **The fit loop** (:func:`build_train_loader`, :func:`is_last_batch`, :func:`logged_step`):
  ``fit_loop.setup_data()``, ``fit_loop.epoch_loop.batch_progress.is_last_batch`` and
  ``fit_loop.epoch_loop._batches_that_stepped`` (the ``step`` Lightning's loggers write).
- **The data-position restore** (:func:`restore_train_position`): the fit loop's
  ``_combined_loader``, ``_data_fetcher`` and ``_combined_loader_states_to_load``; fabric's
  ``_set_sampler_epoch``; torchdata ``StatefulDataLoader`` state keys ``_snapshot`` →
  ``_main_snapshot`` → ``_sampler_iter_yielded``.
- **The CSV logger** (:class:`AppendingCSVLogger`): ``CSVLogger._experiment`` and ``_fs``,
  ``ExperimentWriter._check_log_dir_exists``, ``metrics_keys`` and ``NAME_HPARAMS_FILE``.
- **Checkpoint callbacks** (:func:`mark_step_checkpointed`): ``ModelCheckpoint._last_global_step_saved``
  and ``_last_checkpoint_saved``, by which a ModelCheckpoint skips a step that has a checkpoint
  and its ``save_last`` at train end.
- **Mixed precision** (:func:`unscale_gradients`): the ``scaler`` of Lightning's
  ``MixedPrecision`` plugin, and ``_step_supports_amp_scaling``, by which Lightning and torch's
  GradScaler leave a fused optimizer's gradients scaled until its step.
- **The saved config** (:func:`name_saved_config`): ``SaveConfigCallback.config_filename``.
- **The command line and checkpoints** (:class:`CommandLineOverCheckpoint`): ``LightningCLI._parse_ckpt_path``,
  which merges a checkpoint's hyperparameters over the parsed command line.
- **Noise** (:func:`silence_framework_noise`): the text of Lightning's litlogger/litmodels tips
  (logger ``lightning.pytorch.utilities.rank_zero``), of its ``srun`` hint, of its ``LeafSpec``
  deprecation warning, of its eval-mode, empty-validation-list and used-checkpoint-directory
  warnings.
- **Checkpoint files** (:func:`read_checkpoint`, :func:`is_local_path`): fabric's
  ``cloud_io._load`` (local or fsspec URL) and ``_is_local_file_protocol``.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import warnings
from collections.abc import Sequence
from typing import Any

from lightning import LightningModule, Trainer
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, _load
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torchdata.stateful_dataloader import StatefulDataLoader

# ------------------------------------------------------------------------------------- DDP


def keep_out_of_ddp(module: LightningModule, names: Sequence[str]) -> None:
    """Parameters and buffers of ``module`` (by ``named_parameters``/``named_buffers`` name) that
    DDP neither all-reduces nor broadcasts, added to those named before. Call it from
    ``configure_model``."""
    before = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, before + [n for n in names if n not in before])


# -------------------------------------------------------------------------------- fit loop


def build_train_loader(trainer: Trainer) -> None:
    """Build ``trainer.train_dataloader`` now (from ``configure_optimizers``), as
    ``estimated_stepping_batches`` does, also when ``max_epochs`` is -1."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()


def is_last_batch(trainer: Trainer) -> bool:
    """Whether the training batch being processed is its epoch's last."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def logged_step(trainer: Trainer) -> int:
    """The ``step`` that Lightning's loggers write for rows logged now."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def mark_step_checkpointed(trainer: Trainer, path: str) -> None:
    """Tell every ModelCheckpoint that the current global step has its checkpoint (``path``), so
    none saves again before training ends. After a stop in the middle of an epoch Lightning still
    runs the epoch-end and train-end hooks, and a ``last.ckpt`` saved there reads, on resume, as
    the end of the epoch: the rest of the epoch's batches would be skipped."""
    for callback in trainer.checkpoint_callbacks:
        callback._last_global_step_saved = trainer.global_step  # no save at epoch or validation end
        callback._last_checkpoint_saved = path  # no save_last at train end


def unscale_gradients(trainer: Trainer, optimizer: Optimizer) -> None:
    """Make the gradients of ``optimizer`` their true values before a clip reads them. Under
    ``16-mixed`` Lightning unscales them before clipping, except for a fused optimizer, which
    unscales inside its step: unscale those here (the GradScaler then tells the step)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)


# ---------------------------------------------------------------------- data-position restore


def restore_train_position(trainer: Trainer, states: list[dict[str, Any]], epoch: int) -> None:
    """Restart the train loaders at the checkpoint's positions ``states`` (the fit loop's
    ``combined_loader`` state), with epoch ``epoch``'s order.

    Lightning's own restore of a ``StatefulDataLoader`` misses three cases: it drops the position
    when the loader was built before the checkpoint was read (a ``configure_optimizers`` that asks
    for ``trainer.estimated_stepping_batches``); it replays the position with the sampler still at
    epoch 0 (a ``DistributedSampler`` is set to the resumed epoch only afterwards); and a position
    at the end of an epoch leaves the next epoch without batches. Here the iterator is rebuilt
    from the saved position after setting the sampler's epoch; a position that used up its epoch
    is restored (workers and their augmentation RNGs) and then moved on to the next epoch, as an
    uninterrupted run's persistent workers would be. Call it from ``on_train_start``.
    """
    fit_loop = trainer.fit_loop
    if not states or fit_loop._combined_loader is None or fit_loop._data_fetcher is None:
        return
    loaders = [loader for loader in fit_loop._combined_loader.flattened if isinstance(loader, StatefulDataLoader)]
    if len(loaders) != len(states):
        rank_zero_warn(f"the checkpoint has {len(states)} train loader states for {len(loaders)} loaders: not restored")
        return
    for loader, state in zip(loaders, states):
        main = state.get("_snapshot", {}).get("_main_snapshot", state)  # with workers / without
        _set_sampler_epoch(loader, epoch)
        loader.load_state_dict(state)
        if main["_sampler_iter_yielded"] >= len(loader):
            iter(loader)  # the saved position: its workers, their RNGs, nothing left to yield
            _set_sampler_epoch(loader, epoch + 1)
    fit_loop._combined_loader_states_to_load = []
    iter(fit_loop._data_fetcher)  # the next epoch of a used-up position, as workers continue it


# ------------------------------------------------------------------------------ CSV logger


class _AppendingExperimentWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv``: its header seeds the known columns, new rows are
    appended, and new columns rewrite the file with the union of the columns."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, appending to an existing ``metrics.csv`` (Lightning's deletes it),
    its hyperparameters written to ``hparams_file``."""

    def __init__(self, *args: Any, hparams_file: str = "hparams.yaml", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hparams_file = hparams_file

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
            self._experiment.NAME_HPARAMS_FILE = self.hparams_file
        return self._experiment


def name_saved_config(trainer: Trainer, filename: str) -> None:
    """The file name under which LightningCLI's SaveConfigCallback writes the config."""
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            callback.config_filename = filename


class CommandLineOverCheckpoint:
    """A LightningCLI mixin: the command line and configs decide the model's arguments, not the
    hyperparameters stored in ``--ckpt_path``'s file (Lightning merges those over the command
    line, so an explicit checkpoint silently overrode test-time flags, and a checkpoint of
    another method swapped the model class). ``visionzoo`` checks that the checkpoint is of the
    same method and benchmark instead."""

    def _parse_ckpt_path(self) -> None:
        pass


# ---------------------------------------------------------------------------------- noise


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def silence_framework_noise() -> None:
    """Leave out what Lightning prints on every run that does not apply: its tips to install
    litlogger and litmodels, the ``srun`` hint on a machine that has SLURM but runs no job
    (inside a job srun is used and the hint never shows), a ``LeafSpec`` deprecation warning of
    its own code, and three warnings about choices visionzoo makes on purpose."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Modules frozen with nn.backbones.freeze_ are in eval mode on purpose; an empty validation
    # list is a DataModule's way to skip validation (MVTec with val_fraction 0).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    # A fit into a used run directory is refused unless it resumes (--ckpt_path last) or --overwrite.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


# ------------------------------------------------------------------------- checkpoint files


def read_checkpoint(path: str) -> Any:
    """A user-given checkpoint file read to the CPU, from a local path or an fsspec URL
    (``s3://`` ...), with ``weights_only=True``: tensors and plain values, never code. A file
    that holds more is an error that says why and how to re-save what it needs."""
    try:
        return _load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[-1] if lines else "")
        raise ValueError(
            f"{path}: holds Python objects beyond tensors and plain values ({reason}). visionzoo reads checkpoint "
            "and weight files with torch.load(weights_only=True), which runs no code from them; if you trust this "
            "file, re-save its weights: torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'weights.pt')"
        ) from None


def is_local_path(path: Any) -> bool:
    """Whether ``path`` is on the local file system (not an fsspec URL)."""
    return _is_local_file_protocol(path)
