"""The shape of every benchmark metric (TrackEval's): per-item statistics, then one combine step.

A :class:`BenchmarkMetric` declares the ``fields`` it reads from an evaluation batch merged with
the method's outputs (``image_score``, ``label``, ``embedding`` ...). :meth:`~BenchmarkMetric.statistics`
turns them into one row per item (by default the fields themselves; a metric that can reduce an
item early, as J&F per frame, returns its own named rows). :meth:`~BenchmarkMetric.combine` receives
the rows of all items of every eval set, each item once and in dataset order, and returns named
values. Metrics hold no state: the accumulation across batches and ranks is the evaluation
layer's (``lightning_modules.evaluation``), so that the same class scores an official submission
offline (:meth:`~BenchmarkMetric.score`) and a DDP test run.

- :class:`EvalSetMetric` is computed on each eval set on its own; with several sets its names
  are prefixed ``<set>_`` (``lfw_acc``).
- A metric over several sets (retrieval: queries against a gallery) overrides ``combine``.

Benchmarks evaluated one sequence at a time with state (DAVIS, MOT17) use a
:class:`SequenceMetric`: rows per sequence from its ground truth and the method's predictions,
then one combine step over the rows of every sequence of every rank
(``lightning_modules.sequence_evaluation``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

Rows = Mapping[str, Tensor]


class BenchmarkMetric:
    """Base of the benchmark metrics (module docstring). Subclasses set ``name`` and ``fields``
    (class attributes, or instance attributes where a constructor option chooses the field)."""

    name: ClassVar[str] = ""
    fields: tuple[str, ...] = ()

    def statistics(self, **fields: Any) -> dict[str, Tensor]:
        """Per-item rows of one batch, each [B, ...]; by default the declared fields as they are."""
        return dict(fields)

    def combine(self, sets: Mapping[str, Rows]) -> dict[str, float]:
        """Named values from the rows of all items of each eval set (dataset order, once each)."""
        raise NotImplementedError

    def score(self, sets: Mapping[str, Mapping[str, Any]] | None = None, **fields: Any) -> dict[str, float]:
        """Offline scoring of complete sets, ``{eval_set: {field: value}}``, or of one set given as
        keyword fields: the statistics of each set, then :meth:`combine`."""
        sets = {"test": fields} if sets is None else sets
        return self.combine({name: self.statistics(**{f: values[f] for f in self.fields}) for name, values in sets.items()})


class EvalSetMetric(BenchmarkMetric):
    """A metric computed on each eval set on its own, by :meth:`combine_set`."""

    def combine_set(self, rows: Rows) -> dict[str, float]:
        raise NotImplementedError

    def combine(self, sets: Mapping[str, Rows]) -> dict[str, float]:
        if len(sets) == 1:
            return self.combine_set(next(iter(sets.values())))
        return {f"{name}_{key}": value for name, rows in sets.items() for key, value in self.combine_set(rows).items()}


class SequenceMetric:
    """A metric of a sequence benchmark (module docstring): :meth:`sequence_rows` of one sequence,
    :meth:`combine_rows` of all of them (each sequence once, in dataset order)."""

    def result_labels(self, prediction: Any) -> Any:
        """A method's prediction of a sequence in the benchmark's result format (the submission's)."""
        return prediction

    def sequence_rows(self, name: str, annotations: Any, prediction: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def combine_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        raise NotImplementedError

    def tables(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """The rows as ``results.json`` tables (JSON values), by table name."""
        return {"per_sequence": [dict(row) for row in rows]}
