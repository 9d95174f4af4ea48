"""What every visionzoo method shares: its name, and evaluation through one layer.

Evaluation (DESIGN.md, "Evaluation layer"): a method (an :class:`EvaluatedModule`) returns its
per-sample outputs from :meth:`~EvaluatedModule.evaluation_outputs` and names its metrics
(``benchmarks.metrics``) in :meth:`~EvaluatedModule.evaluation_metrics`. The base class merges each batch with the outputs,
hands them to the stage's :class:`Evaluation` (per-item statistics into
:class:`~lightning_modules.distributed.indexed_outputs.IndexedOutputs`), and at epoch end gathers
the items of every rank once each, combines every metric and logs the values as
``<stage>/<name>``. Batches carry ``eval_set`` and ``index`` (``datamodules.base.EvalSet``), so
the results do not depend on the order of the loaders or on the world size. A ``None`` batch
(every sample corrupt and skipped) is left out. ``validation_step``/``test_step`` return the
outputs, for callbacks (pictures, submission writers).

Every method sets ``method_name`` (a class attribute, or a property where a constructor option
decides it): the ``<method>`` of ``runs/<benchmark>/<method>/`` and of ``results.json``. Work
that must follow each optimizer step, such as a momentum encoder's update, goes in
:meth:`VisionZooModule.after_optimizer_step`, which runs once per step under gradient
accumulation (``on_train_batch_end`` runs once per batch).

Prediction (``visionzoo predict``): a method returns the per-sample arrays a user keeps (anomaly
maps, embeddings, clip features) from :meth:`~VisionZooModule.prediction_outputs`; the base
collects them through the same indexed outputs, and at epoch end holds every rank's rows once
each, in dataset order, with the sample paths, in :attr:`VisionZooModule.predictions` for
:class:`callbacks.predictions.PredictionFiles` to write.

A trained method takes its optimizer and schedule as one ``optim`` argument
(:class:`~lightning_modules.recipe.OptimizerRecipe`, saved with its hyperparameters);
:meth:`VisionZooModule.configure_optimizers` is the one place that builds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning import LightningModule
from torch import Tensor, nn

from benchmarks.metrics.base import BenchmarkMetric
from lightning_modules.distributed.comm import all_gather_objects
from lightning_modules.distributed.indexed_outputs import INDEX, IndexedOutputs
from lightning_modules.framework import unscale_gradients
from lightning_modules.recipe import OptimizerRecipe

Stage = Literal["val", "test"]
EVAL_SET = "eval_set"


class Evaluation:
    """The metrics of one evaluation pass over indexed outputs (module docstring)."""

    def __init__(self, metrics: Sequence[BenchmarkMetric]) -> None:
        self.metrics = list(metrics)
        self.outputs = IndexedOutputs()
        self.missing: dict[str, list[int]] = {}

    def update(self, values: Mapping[str, Any]) -> None:
        """One batch: its fields merged with the method's outputs, with ``eval_set`` and ``index``."""
        for key in (EVAL_SET, INDEX):
            if key not in values:
                raise KeyError(f"an evaluation batch needs the field {key!r} (wrap the eval dataset in "
                               "datamodules.base.EvalSet); it has " + ", ".join(sorted(values)))
        rows: dict[str, Tensor] = {}
        for metric in self.metrics:
            missing = [field for field in metric.fields if field not in values]
            if missing:
                raise KeyError(f"{type(metric).__name__} reads {missing} from the batch or the method's outputs, "
                               f"which have {sorted(values)}")
            rows.update(metric.statistics(**{field: values[field] for field in metric.fields}))
        self.outputs.append(values[EVAL_SET], values[INDEX], **rows)

    def compute(self, across_ranks: bool = True, sizes: Mapping[str, int] | None = None) -> dict[str, float]:
        """Every metric's values over all items of every rank (each item once). With the eval
        sets' ``sizes``, the indices that no rank evaluated (corrupt samples skipped) are left in
        :attr:`missing`."""
        sets = self.outputs.gather(across_ranks)
        for name, size in (sizes or {}).items():
            seen = set(sets[name][INDEX].tolist()) if name in sets else set()
            self.missing[name] = sorted(set(range(size)) - seen)
        results: dict[str, float] = {}
        for metric in self.metrics:
            values = metric.combine(sets)
            clash = results.keys() & values.keys()
            if clash:
                raise ValueError(f"{type(metric).__name__} reports {sorted(clash)}, already reported by another metric")
            results.update(values)
        return results


class VisionZooModule(LightningModule):
    """Base of every method: its ``method_name`` (module docstring). A method evaluated by its
    benchmark's metrics extends :class:`EvaluatedModule`; a pretraining method without an
    evaluation of its own (SeCo, CMD, CSTP) extends this one, so that Lightning runs no
    validation loop for it."""

    method_name: str
    #: Whether each rank trains on its share of the training set (data parallel). ``False``: every
    #: rank iterates the whole set each epoch, in the same order (Search-Softmax's search workers).
    shards_training_data: bool = True

    def train(self, mode: bool = True) -> VisionZooModule:
        """Modules frozen with :func:`~lightning_modules.nn.backbones.freeze_` stay in eval mode."""
        super().train(mode)
        for module in self.modules():
            if module is not self and getattr(module, "frozen", False):  # a frozen method (an old model) too
                module.eval()
        return self

    # ----------------------------------------------------------------------- optimizer steps

    def parameters_with_own_optimizer(self) -> Iterable[nn.Parameter]:
        """Trainable parameters that the recipe's optimizer leaves alone (Search-Softmax's policy)."""
        return ()

    @property
    def recipe(self) -> OptimizerRecipe:
        """The ``optim`` hyperparameter (a dict where it came from a config or a checkpoint)."""
        optim = self.hparams.get("optim")
        if optim is None:
            raise TypeError(f"{type(self).__name__} is not trained by visionzoo fit: it takes no optim recipe")
        return optim if isinstance(optim, OptimizerRecipe) else OptimizerRecipe(**optim)

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        """The recipe's parameter groups, in an order that does not depend on the world size."""
        return self.recipe.parameter_groups(self, exclude=self.parameters_with_own_optimizer())

    def configure_optimizers(self) -> dict[str, Any]:
        return self.recipe.configure(self.trainer, self.optimizer_parameter_groups(), self.method_name)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's ``gradient_clip_val`` (all parameters), then the recipe's
        ``backbone_grad_clip_norm`` (the ``backbone`` module's parameters only)."""
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        limit = self.recipe.backbone_grad_clip_norm if "optim" in self.hparams else None
        if limit is not None:
            backbone = getattr(self, "backbone", None)
            if not isinstance(backbone, nn.Module):
                raise TypeError(f"optim.backbone_grad_clip_norm: {type(self).__name__} has no backbone module to clip")
            unscale_gradients(self.trainer, optimizer)
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), limit)

    def after_optimizer_step(self) -> None:
        """Work that follows each optimizer step (a momentum encoder's EMA update): called once
        per step, so every ``accumulate_grad_batches`` training batches, not after every batch."""

    def on_train_start(self) -> None:
        self._optimizer_steps = self.trainer.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps; it has moved when this batch ended one.
        if self.trainer.global_step != self._optimizer_steps:
            self._optimizer_steps = self.trainer.global_step
            self.after_optimizer_step()


    # ------------------------------------------------------------------------------ prediction

    def prediction_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-sample outputs that ``visionzoo predict`` writes, by name ([B, ...] each)."""
        raise NotImplementedError(f"{type(self).__name__} has no prediction outputs")

    def on_predict_epoch_start(self) -> None:
        self._predicted = IndexedOutputs()
        self._predicted_paths: dict[tuple[str, int], str] = {}

    def predict_step(self, batch: dict[str, Any] | None, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        if batch is None:
            return None
        for key in (EVAL_SET, INDEX, "path"):
            if key not in batch:
                raise KeyError(f"a predicted batch needs the field {key!r} (an EvalSet of samples with their path); "
                               "it has " + ", ".join(sorted(batch)))
        outputs = self.prediction_outputs(batch)
        self._predicted.append(batch[EVAL_SET], batch[INDEX], **outputs)
        names = [batch[EVAL_SET]] * len(batch["path"]) if isinstance(batch[EVAL_SET], str) else batch[EVAL_SET]
        self._predicted_paths.update(zip(zip(names, batch[INDEX].tolist()), batch["path"]))
        return outputs

    def on_predict_epoch_end(self) -> None:
        """Every rank's rows once each, by eval set in dataset order, with ``path`` (a list) beside them."""
        paths = {key: path for part in all_gather_objects(self._predicted_paths) for key, path in part.items()}
        self.predictions = {
            name: {**rows, "path": [paths[name, i] for i in rows[INDEX].tolist()]}
            for name, rows in self._predicted.gather().items()
        }


class EvaluatedModule(VisionZooModule):
    """A method evaluated through the evaluation layer (module docstring)."""

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        """The metrics of validation (``val``) or ``test``; none by default."""
        return []

    def evaluation_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-sample outputs of an evaluation batch, named as the metrics' fields."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate: it has no evaluation_outputs")

    # ------------------------------------------------------------------------------ the loop

    def _start(self, stage: Stage) -> None:
        self.skipped_items: dict[str, list[str]] = getattr(self, "skipped_items", {})
        self._evaluations = getattr(self, "_evaluations", {})
        self._evaluations[stage] = Evaluation(self.evaluation_metrics(stage))

    def _step(self, stage: Stage, batch: dict[str, Any] | None) -> dict[str, Tensor] | None:
        if batch is None:
            return None
        outputs = self.evaluation_outputs(batch)
        self._evaluations[stage].update({**batch, **outputs})
        return outputs

    def _end(self, stage: Stage) -> None:
        evaluation = self._evaluations.pop(stage)
        if evaluation.metrics and not self.trainer.sanity_checking:
            loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
            loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
            eval_sets = {loader.dataset.name: loader.dataset for loader in loaders if hasattr(loader.dataset, "item_name")}
            results = evaluation.compute(sizes={name: len(dataset) for name, dataset in eval_sets.items()})
            # Every rank combines the same gathered items, so every rank logs the same values; as
            # float64 tensors, which Lightning keeps (a Python float is logged in float32).
            self.log_dict({f"{stage}/{key}": torch.tensor(value, dtype=torch.float64) for key, value in results.items()},
                          sync_dist=False)
            self.skipped_items[stage] = sorted({eval_sets[name].item_name(i) for name, missing in evaluation.missing.items()
                                                for i in missing})

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        return self._step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def test_step(self, batch: dict[str, Any] | None, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        return self._step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._end("test")
