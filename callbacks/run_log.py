"""``metrics.csv`` of a run directory that survives re-runs: ``fit``, ``test`` and a resumed
``fit`` all append to the same file (Lightning's CSVLogger deletes an existing one)."""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingExperimentWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv``: its header seeds the known columns, new rows are
    appended, and new columns rewrite the file with the union of the columns."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """CSVLogger writing ``<run dir>/metrics.csv`` and ``hparams.yaml`` directly in the run
    directory, appending to what earlier commands of the same run wrote."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(save_dir=run_dir, name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
