"""``visionzoo predict`` output: each method's per-sample arrays as ``.npy`` files, with the
sample paths beside them.

For every predicted eval set (MVTec: ``test``; MS1M: ``predict`` for ``data.predict_root``, else
each verification set; UCF101: ``test``, and ``gallery`` with ``test_gallery``) the run
directory gets ``predictions/<set>/``:

- ``<output>.npy`` for each of the method's prediction outputs (MSFlow: ``anomaly_map``,
  ``detection_map``, ``image_score``; face methods: ``embedding``, L2-normalised; video methods:
  ``features``, and ``logits`` for a classifier), one row per sample;
- ``index.npy``, each row's position in the set, and ``paths.txt``, each row's file, one a line.

Rows are every rank's, once each, in dataset order (:meth:`lightning_modules.base.VisionZooModule.on_predict_epoch_end`
gathers them). The folder is written beside and swapped in whole, so a failed run leaves the
previous predictions as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from callbacks.submission import replace_directory


class PredictionFiles(Callback):
    """Writes ``pl_module.predictions`` under ``<run dir>/<directory>`` (module docstring)."""

    def __init__(self, directory: str = "predictions") -> None:
        self.directory = directory

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            final = Path(trainer.default_root_dir) / self.directory
            staging = final.with_name(f".{final.name}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            for name, rows in pl_module.predictions.items():
                folder = staging / name
                folder.mkdir(parents=True)
                for key, value in rows.items():
                    if key == "path":
                        (folder / "paths.txt").write_text("".join(f"{path}\n" for path in value))
                    else:
                        np.save(folder / f"{key}.npy", (value.float() if value.is_floating_point() else value).numpy())
            staging.mkdir(parents=True, exist_ok=True)  # a run that predicted nothing
            replace_directory(final, staging)
            counts = ", ".join(f"{name}: {len(rows['path'])} samples" for name, rows in pl_module.predictions.items())
            rank_zero_info(f"predictions written to {final} ({counts or 'nothing predicted'})")
        trainer.strategy.barrier()
