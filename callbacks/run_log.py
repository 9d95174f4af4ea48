"""``metrics.csv`` of a run directory that survives re-runs: ``fit``, ``test`` and a resumed
``fit`` all append to the same file (Lightning's CSVLogger deletes an existing one); each command
keeps its own ``hparams`` file."""

from __future__ import annotations

from lightning_modules.framework import AppendingCSVLogger


class RunCSVLogger(AppendingCSVLogger):
    """CSVLogger writing ``<run dir>/metrics.csv`` directly in the run directory, appending to
    what earlier commands of the same run wrote, and the hyperparameters of each command to its
    own file: ``hparams.yaml`` for ``fit``, ``hparams.<command>.yaml`` for the others, so that a
    test never overwrites what the fit recorded."""

    def __init__(self, run_dir: str, command: str = "fit") -> None:
        super().__init__(save_dir=run_dir, name="", version="", hparams_file=command_file("hparams", command))


def command_file(stem: str, command: str) -> str:
    """``<stem>.yaml`` for ``fit``, ``<stem>.<command>.yaml`` for the other commands."""
    return f"{stem}.yaml" if command == "fit" else f"{stem}.{command}.yaml"
