"""The callbacks every visionzoo run has (``lightning_modules/cli.py`` installs them; the perf
scripts measure them): throughput lines where no progress bar is drawn, the NaN guard, the
checkpoint on a signal, the resume state, and the Rich progress bar on a terminal."""

from __future__ import annotations

from lightning import Callback
from lightning.pytorch.callbacks import RichProgressBar

from callbacks.nan_guard import FiniteLossGuard
from callbacks.preemption import CheckpointOnSignal
from callbacks.resume import ResumeState
from callbacks.throughput import Throughput


def default_callbacks(on_terminal: bool) -> list[Callback]:
    """A fresh list of the default callbacks (module docstring)."""
    return [Throughput(print_lines=not on_terminal), FiniteLossGuard(), CheckpointOnSignal(), ResumeState()] + (
        [RichProgressBar()] if on_terminal else [])
