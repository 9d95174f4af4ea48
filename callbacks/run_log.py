"""``metrics.csv`` of a run directory that survives re-runs: ``fit``, ``test`` and a resumed
``fit`` all append to the same file (Lightning's CSVLogger deletes an existing one)."""

from __future__ import annotations

from lightning_modules.framework import AppendingCSVLogger


class RunCSVLogger(AppendingCSVLogger):
    """CSVLogger writing ``<run dir>/metrics.csv`` and ``hparams.yaml`` directly in the run
    directory, appending to what earlier commands of the same run wrote."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(save_dir=run_dir, name="", version="")
