"""``results.json``: what a ``visionzoo test`` run measured, and everything needed to trust it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

RESULTS_FILE = "results.json"


def git_revision(directory: Path) -> str | None:
    """``git describe``-like revision of the code in ``directory`` (``-dirty`` when modified)."""
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{revision}-dirty" if dirty else revision


def write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so a crash never leaves a
    half-written file and the previous one stays until the new one is complete."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(temporary, path)


class ResultsWriter(Callback):
    """Writes ``<run dir>/results.json`` at the end of ``test``: benchmark, method, dataset
    description (root, split, selectors), every logged ``test/`` metric, the number of corrupt
    samples skipped, checkpoint (``untrained`` when a trained method was tested with
    ``--ckpt_path none``), the full config, git revision, versions and time. Read by
    ``benchmarks.leaderboard``. The DataModule and the method are visionzoo's
    (``datamodules.base.VisionZooDataModule``, ``lightning_modules.base.VisionZooModule``)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        metrics = {
            key.removeprefix("test/"): float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("test/")
        }
        results = {
            "benchmark": datamodule.benchmark,
            "method": pl_module.method_name,
            "dataset": datamodule.describe(),
            "metrics": metrics,
            "skipped_corrupt": datamodule.num_skipped,
            # Which: left out at setup, or evaluated by no rank (skipped while loading).
            "skipped_items": sorted({*datamodule.skipped_files, *pl_module.skipped_items.get("test", [])}),
            # Per-sequence / per-object tables of sequence benchmarks (DAVIS), beside the global numbers.
            **({"tables": pl_module.result_tables["test"]} if "test" in getattr(pl_module, "result_tables", {}) else {}),
            "checkpoint": str(Path(trainer.ckpt_path).resolve()) if trainer.ckpt_path else None,
            # A trained method evaluated without a checkpoint (--ckpt_path none): a baseline, not a result.
            "untrained": not trainer.ckpt_path and "optim" in pl_module.hparams,
            "config": self.config,
            "git_revision": git_revision(Path(__file__).resolve().parent),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__},
            "device": f"{trainer.num_nodes} node(s) x {trainer.num_devices} {type(trainer.accelerator).__name__}",
        }
        path = Path(trainer.default_root_dir) / RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, results)
        rank_zero_info(f"results written to {path}")
