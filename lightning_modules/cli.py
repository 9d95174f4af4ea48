"""``visionzoo``: the LightningCLI of the suite (subcommands fit, validate, test, predict).

Model and data are given by ``class_path``/``init_args`` in one or more ``--config`` files
(``configs/<benchmark>/<method>.yaml`` plus presets from ``configs/trainer/``). On top of
LightningCLI this adds what every run of the suite shares:

- a stable run directory, ``runs/<benchmark>/<method>/<run name>`` (the run name defaults to the
  DataModule's, e.g. the MVTec category; ``--run_name`` or ``--trainer.default_root_dir`` override
  it), so that a requeued job finds its own checkpoints;
- a CSV logger appending to ``metrics.csv`` there (fit, test and resumed fits share it);
  ``config.yaml`` and ``hparams.yaml`` of the fit (a re-run of fit overwrites them), and
  ``config.<command>.yaml``/``hparams.<command>.yaml`` of validate, test and predict; and
  ``checkpoints/last.ckpt``, written atomically (:mod:`callbacks.checkpoint_io`);
- a Rich progress bar on a terminal, plain log lines with throughput and ETA otherwise;
- ``results.json`` after ``test`` (see :mod:`callbacks.results`), ``predictions/`` after
  ``predict`` (:mod:`callbacks.predictions`);
- a stop at the first NaN/Inf loss, before it reaches the weights (:mod:`callbacks.nan_guard`);
- on SIGUSR1, a checkpoint at the next batch boundary and a SLURM requeue; on SIGTERM and SIGINT
  the same checkpoint, then an exit status of 128 + the signal (:mod:`callbacks.preemption`);
- exact resume: RNG states in every checkpoint, ``metrics.csv`` without the rows a killed run
  logged after its last checkpoint (:mod:`callbacks.resume`), mid-epoch data position
  (:mod:`datamodules.resumable`); ``seed_everything`` defaults to 0.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from callbacks.checkpoint_io import AtomicCheckpointIO
from callbacks.defaults import default_callbacks
from callbacks.predictions import PredictionFiles
from callbacks.preemption import CheckpointOnSignal
from callbacks.results import ResultsWriter
from callbacks.resume import LastCheckpointEvery, RestartLearningRateSchedule
from callbacks.run_log import RunCSVLogger, command_file
from datamodules.base import VisionZooDataModule
from lightning_modules.base import VisionZooModule
from lightning_modules.framework import CommandLineOverCheckpoint, name_saved_config, silence_framework_noise

RUNS_ROOT = Path("runs")
#: visionzoo's own packages, whose ``logging`` records (``log.info`` of a DataModule, a metric, a
#: method) the command shows as Lightning shows its own: info from rank 0 only, warnings from all.
PACKAGES = ("benchmarks", "callbacks", "datamodules", "lightning_modules")


class _RankZeroInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or rank_zero_only.rank == 0


def show_visionzoo_logs() -> None:
    """Records of :data:`PACKAGES` at INFO and above on stderr (once per process)."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RankZeroInfo) for h in logger.handlers for f in h.filters):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.addFilter(_RankZeroInfo())
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


class VisionZooCLI(CommandLineOverCheckpoint, LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        on_terminal = sys.stdout.isatty()
        silence_framework_noise()
        show_visionzoo_logs()
        super().__init__(
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            # One optimiser recipe, the method's `optim` (lightning_modules/recipe.py): no --optimizer/--lr_scheduler.
            auto_configure_optimizers=False,
            # A fixed default seed: a resumed run must reuse its seed (the DDP sampler's order
            # depends on it), and runs are reproducible unless a seed is asked for.
            seed_everything_default=0,
            trainer_defaults={"enable_progress_bar": on_terminal, "callbacks": default_callbacks(on_terminal)},
        )

    def add_arguments_to_parser(self, parser) -> None:
        # Classification heads take their size from the data (MS1M: the property file), detectors
        # on feature vectors their input size (ADBench's embeddings).
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_features", "model.init_args.in_features", apply_on="instantiate")
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Last component of the run directory runs/<benchmark>/<method>/<run_name> "
            "(default: the DataModule's run name, e.g. the MVTec category).",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=500,
            help="fit: also write checkpoints/last.ckpt every N optimizer steps, whatever the validation schedule "
            "(0: only after validation, Lightning's default).",
        )
        parser.add_argument(
            "--restart_lr_schedule",
            type=bool,
            default=False,
            help="fit --ckpt_path: resume weights, momentum and data position, but start the learning-rate schedule "
            "again from the config's recipe (the checkpoint's carries the rate it was trained with).",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: replace the run in the run directory (its checkpoints, metrics.csv and results.json) "
            "instead of refusing to start a fresh run there.",
        )

    def run_directory(self, run_name: str | None) -> Path:
        """``runs/<benchmark>/<method>/<run name>`` from the DataModule's and the method's contracts."""
        for thing, base in ((self.datamodule, VisionZooDataModule), (self.model, VisionZooModule)):
            if not isinstance(thing, base):
                raise TypeError(f"{type(thing).__module__}.{type(thing).__name__} is not a {base.__name__}: visionzoo "
                                f"runs subclasses of {base.__module__}.{base.__name__}, which name the run directory")
        return RUNS_ROOT / self.datamodule.benchmark / self.model.method_name / (run_name or self.datamodule.run_name)

    def _newest_checkpoint(self) -> Path | None:
        """The newest checkpoint of the run directory: ``last.ckpt`` or an ``hpc_ckpt_<n>.ckpt``
        written on SIGUSR1 (:mod:`callbacks.preemption`)."""
        run_dir = Path(self.trainer.default_root_dir)
        candidates = [*run_dir.glob("checkpoints/last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
        return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None

    def _check_checkpoint(self, path: str | None) -> None:
        """A checkpoint of another method or DataModule is an error naming both; hyperparameters
        that differ from this run's are listed (this run's, from the command line, are used and
        recorded in ``config.<command>.yaml`` and ``results.json``)."""
        if path is None or not Path(path).is_file():
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, mine in (("hyper_parameters", self.model), ("datamodule_hyper_parameters", self.datamodule)):
            saved = checkpoint.get(key, {}).get("_class_path")
            this = f"{type(mine).__module__}.{type(mine).__qualname__}"
            if key == "datamodule_hyper_parameters" and getattr(mine, "tests_models_of_other_data", False):
                continue  # a test set of its own (ROxford5k for a GLDv2 model)
            if saved is not None and saved != this:
                raise ValueError(f"{path} was written by a run of {saved}, but this run's "
                                 f"{'model' if key == 'hyper_parameters' else 'data'} is {this}: use the config of the "
                                 "run that wrote it")
        saved = checkpoint.get("hyper_parameters", {})
        differ = {k: (saved[k], v) for k, v in self.model.hparams.items() if k in saved and not k.startswith("_")
                  and saved[k] != v and not (isinstance(v, dict | list | tuple) or dataclasses.is_dataclass(v))}
        if differ:
            rank_zero_info("this run's model arguments differ from the checkpoint's, and are used: "
                           + ", ".join(f"{k} {new!r} (checkpoint: {old!r})" for k, (old, new) in differ.items()))

    def before_fit(self) -> None:
        """``--ckpt_path last`` resumes from the run directory's newest checkpoint, or starts
        afresh when it has none. A fresh fit into a run directory that holds checkpoints is an
        error (its metrics and checkpoints would mix with the new run's) unless ``--overwrite``,
        which removes that run's checkpoints, ``metrics.csv`` and ``results.json`` first."""
        kwargs = self.config_init["fit"]
        newest = self._newest_checkpoint()
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = str(newest) if newest else None
            self._check_checkpoint(kwargs["ckpt_path"])
        elif kwargs.get("ckpt_path") is not None:
            self._check_checkpoint(kwargs["ckpt_path"])
        elif newest is not None:
            run_dir = Path(self.trainer.default_root_dir)
            if not kwargs.get("overwrite"):
                raise FileExistsError(
                    f"{run_dir} already holds a run ({newest.relative_to(run_dir)}): resume it with --ckpt_path last, "
                    "start a separate run with --run_name NAME (or --trainer.default_root_dir DIR), or replace it "
                    "with --overwrite")
            if self.trainer.is_global_zero:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                for stale in [*run_dir.glob("hpc_ckpt_*"), run_dir / "metrics.csv", run_dir / "results.json"]:
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
            self.trainer.strategy.barrier("visionzoo overwrite")

    def after_fit(self) -> None:
        """A fit stopped by SIGTERM or SIGINT (after saving a checkpoint) exits non-zero."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, CheckpointOnSignal) and callback.exit_status():
                rank_zero_info(f"stopped by {callback.stopped_by.name} at global step {self.trainer.global_step}; "
                               f"checkpoint {callback.checkpoint}; resume with --ckpt_path last")
                sys.exit(callback.exit_status())

    def _evaluated_checkpoint(self, subcommand: str) -> None:
        """The weights ``validate``, ``test`` and ``predict`` evaluate: ``--ckpt_path last`` (the
        run directory's newest checkpoint; an error naming the directory when it has none), a
        path, or ``--ckpt_path none`` for the untrained model of a trained method (marked
        ``untrained`` in ``results.json``). A trained method without ``--ckpt_path`` is an error:
        random weights are never evaluated silently. Methods not trained by visionzoo (clip
        retrieval of a pretraining checkpoint) need none."""
        kwargs = self.config_init[subcommand]
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path == "last":
            newest = self._newest_checkpoint()
            if newest is None:
                run_dir = Path(self.trainer.default_root_dir)
                raise FileNotFoundError(
                    f"--ckpt_path last: no checkpoint in the run directory {run_dir} (searched "
                    f"{run_dir / 'checkpoints'}/last*.ckpt and {run_dir}/hpc_ckpt_*.ckpt). Train it first "
                    "(visionzoo fit with the same config and run name), give a checkpoint path, or pass "
                    "--ckpt_path none to evaluate the untrained model")
            kwargs["ckpt_path"] = str(newest)
        elif isinstance(ckpt_path, str) and ckpt_path.lower() == "none":
            kwargs["ckpt_path"] = None
        elif ckpt_path is None and "optim" in self.model.hparams:
            raise ValueError(
                f"visionzoo {subcommand} of {self.model.method_name} needs the weights to evaluate: --ckpt_path last "
                "(the run directory's newest checkpoint), --ckpt_path PATH, or --ckpt_path none for the untrained "
                "model (results.json then marks it untrained)")
        self._check_checkpoint(kwargs.get("ckpt_path"))

    def before_validate(self) -> None:
        self._evaluated_checkpoint("validate")

    def before_test(self) -> None:
        self._evaluated_checkpoint("test")

    def before_predict(self) -> None:
        self._evaluated_checkpoint("predict")

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = self.config_init[self.subcommand].trainer if self.subcommand else self.config_init.trainer
        if trainer.default_root_dir is None:
            trainer.default_root_dir = str(self.run_directory(config.get("run_name")))
        command = self.subcommand or "fit"
        if trainer.logger is None:
            trainer.logger = RunCSVLogger(trainer.default_root_dir, command)
        callbacks = list(trainer.callbacks or [])
        if trainer.enable_checkpointing is not False and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            # Both write last.ckpt itself (no last-v1.ckpt beside it): the newest state is always there.
            callbacks.append(ModelCheckpoint(save_last=True, enable_version_counter=False))
            callbacks.append(LastCheckpointEvery(config.get("checkpoint_every_n_steps", 0)))
        callbacks.append(ResultsWriter(config=config.clone().as_dict()))
        if config.get("restart_lr_schedule"):
            callbacks.append(RestartLearningRateSchedule())
        if self.subcommand == "predict" and not any(isinstance(c, PredictionFiles) for c in callbacks):
            callbacks.append(PredictionFiles())
        trainer.callbacks = callbacks
        plugins = trainer.plugins if isinstance(trainer.plugins, list) else [p for p in [trainer.plugins] if p is not None]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            trainer.plugins = [*plugins, AtomicCheckpointIO()]
        instantiated = super().instantiate_trainer(**kwargs)
        name_saved_config(instantiated, command_file("config", command))  # the fit's provenance stays
        return instantiated


def main(args: list[str] | None = None) -> None:
    VisionZooCLI(args=args)


if __name__ == "__main__":
    main()
