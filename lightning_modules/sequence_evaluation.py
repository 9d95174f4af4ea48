"""The sequence evaluation loop: methods whose inference carries state across the frames of a
sequence (video object segmentation, tracking), evaluated one whole sequence at a time.

The DataModule serves one sequence a batch, each on exactly one rank (``datamodules.davis``:
``SequenceShards``, longest first) and names the benchmark's
:class:`~benchmarks.metrics.base.SequenceMetric` (``sequence_metric()``). For each sequence the
loop runs the method's stateful inference:

1. ``state = init_sequence(item)`` (the first frame, and its object masks where the task gives
   them);
2. ``prediction_t = step_sequence(state, t, frame_t)`` for every following frame (the first
   frame's prediction is the given masks in the semi-supervised task);
3. the state is dropped, the metric's rows of the sequence kept, and the predictions returned by
   ``test_step`` for the submission writer (``callbacks.submission``).

At epoch end the rows of every rank are gathered, ordered by sequence, combined once and logged
as ``<stage>/<name>``; the per-sequence rows go to ``results.json`` (``result_tables``). The log
shows each sequence with its frames per second.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.base import EvaluatedModule, Stage
from lightning_modules.distributed.comm import all_gather_objects


class SequenceEvaluatedModule(EvaluatedModule):
    """Base of the methods evaluated by the sequence loop (module docstring)."""

    def init_sequence(self, item: Any) -> Any:
        """The inference state of a new sequence from its first frame (``item.frames[0]``) and,
        in the semi-supervised task, its objects (``item.first_masks``)."""
        raise NotImplementedError

    def step_sequence(self, state: Any, t: int, frame: np.ndarray) -> np.ndarray:
        """The label map [H, W] (0 background, 1..N objects) of frame ``t`` [H, W, 3] uint8."""
        raise NotImplementedError

    def predict_sequence(self, item: Any) -> np.ndarray:
        """Label maps [T, H, W] uint8 of every frame of the sequence."""
        state = self.init_sequence(item)
        first = item.first_masks if item.first_masks is not None else self.step_sequence(state, 0, item.frames[0])
        predictions = [first] + [self.step_sequence(state, t, item.frames[t]) for t in range(1, len(item.frames))]
        del state
        return np.stack(predictions).astype(np.uint8)

    # ------------------------------------------------------------------------------ the loop

    def _start(self, stage: Stage) -> None:
        self.skipped_items = getattr(self, "skipped_items", {})
        self.result_tables: dict[str, dict[str, list]] = getattr(self, "result_tables", {})
        self._metric = self.trainer.datamodule.sequence_metric()
        self._rows: list[tuple[int, list[dict[str, Any]]]] = []
        self._sequences_done = 0

    def _step(self, stage: Stage, batch: Any) -> dict[str, Any] | None:
        if batch is None:
            return None
        started = time.perf_counter()
        prediction = self.predict_sequence(batch)
        seconds = time.perf_counter() - started
        self._rows.append((batch.index, self._metric.sequence_rows(batch.name, batch.annotations, prediction)))
        self._sequences_done += 1
        rank_zero_info(f"{stage} sequence {batch.name}: {len(batch.frames)} frames at {len(batch.frames) / seconds:.1f} "
                       f"frames/s ({self._sequences_done} sequences done by this rank)")
        return {"name": batch.name, "frame_names": batch.frame_names, "prediction": prediction,
                "result": self._metric.result_labels(prediction)}

    def _end(self, stage: Stage) -> None:
        if self.trainer.sanity_checking:
            return
        gathered = sorted((index, rows) for part in all_gather_objects(self._rows) for index, rows in part)
        indices = [index for index, _ in gathered]
        if len(set(indices)) != len(indices):
            raise RuntimeError(f"sequences evaluated on more than one rank: {sorted(indices)}")
        rows = [row for _, sequence_rows in gathered for row in sequence_rows]
        results = self._metric.combine_rows(rows)
        self.log_dict({f"{stage}/{key}": torch.tensor(value, dtype=torch.float64) for key, value in results.items()},
                      sync_dist=False)
        self.result_tables[stage] = self._metric.tables(rows)
        self.skipped_items[stage] = []
