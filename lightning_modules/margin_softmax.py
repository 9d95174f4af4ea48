"""Training by a margin softmax over class centres sharded across all ranks (the model-parallel
softmax of insightface's ``arcface_torch``), shared by the face recognisers and the landmark
retrieval models.

:class:`MarginSoftmaxTraining` builds this rank's shard of the centres once the process group
exists (``configure_model``), keeps it out of DDP's all-reduce, trains ``softmax(self(images),
labels)`` and moves the centres, and their momentum, through per-rank shard files beside each
checkpoint, so that no rank ever holds the whole head and a checkpoint resumes on any number of
ranks (:mod:`~lightning_modules.distributed.sharded_state`). A method provides ``forward(images)
-> embeddings``, ``self.head`` (a :class:`~lightning_modules.nn.margins.MarginHead`),
``self.softmax_options`` and the hyperparameters ``num_classes`` (None: a model used for
evaluation only, without a head), ``embedding_size`` and ``seed``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_modules.base import EvaluatedModule
from lightning_modules.distributed.model_parallel_softmax import ModelParallelSoftmax
from lightning_modules.distributed.sharded_state import SHARDS, read_rows, write_shards
from lightning_modules.framework import keep_out_of_ddp

CENTRES_KEY = "softmax.weight"


class MarginSoftmaxTraining(EvaluatedModule):
    """A method trained by the model-parallel margin softmax (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax: ModelParallelSoftmax | None = None  # built in configure_model: needs the process group

    def configure_model(self) -> None:
        """Build this rank's shard of the class centres and keep it out of DDP's all-reduce."""
        if self.softmax is not None or self.hparams.num_classes is None:
            return
        hp = self.hparams
        self.softmax = ModelParallelSoftmax(hp.num_classes, hp.embedding_size, self.head, self.softmax_options, seed=hp.seed)
        ignored = [f"softmax.{name}" for name in self.softmax.model_parallel_parameter_names()]
        ignored += [f"softmax.head.{name}" for name, _ in self.head.named_buffers()]
        keep_out_of_ddp(self, ignored)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.softmax(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # ------------------------------------------------------------- checkpoints across world sizes

    def _centres_optimizer_states(self, checkpoint: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
        """(optimizer state, slot) of the centres in each of the checkpoint's optimizers. The
        optimizer numbers parameters as ``configure_optimizers`` orders them, which does not
        depend on the world size."""
        parameters = [p for group in self.optimizer_parameter_groups() for p in group["params"]]
        slot = next(i for i, p in enumerate(parameters) if p is self.softmax.weight)
        return [(optimizer["state"], slot) for optimizer in checkpoint.get("optimizer_states", [])]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The centres and their momentum go to per-rank shard files, each rank's own rows
        (:mod:`~lightning_modules.distributed.sharded_state`; a collective: every rank saves).
        ``optimizer.state_dict()`` shares its per-parameter dicts with the live optimizer, so
        entries are replaced, never modified in place."""
        if self.softmax is None:
            return
        tensors = {"weight": checkpoint["state_dict"].pop(CENTRES_KEY)}
        for states, slot in self._centres_optimizer_states(checkpoint):
            if "momentum_buffer" in states.get(slot, {}):
                tensors["momentum"] = states[slot]["momentum_buffer"]
                states[slot] = {k: v for k, v in states[slot].items() if k != "momentum_buffer"}
        checkpoint[SHARDS] = write_shards(tensors, self.softmax.start, self.hparams.num_classes,
                                          self.trainer.default_root_dir, self.trainer.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """This rank's rows of the centres and their momentum, whatever the saving world size."""
        self.configure_model()
        if self.softmax is None:  # evaluation only: the head is not needed
            return
        if SHARDS not in checkpoint:
            raise ValueError("the checkpoint has no sharded class centres: it was not written by this version of "
                             "visionzoo (before, the centres were stored whole in the checkpoint file)")
        rows = read_rows(checkpoint[SHARDS], self.softmax.start, self.softmax.end)
        checkpoint["state_dict"][CENTRES_KEY] = rows["weight"]
        for states, slot in self._centres_optimizer_states(checkpoint):
            if "momentum" in rows:
                states[slot] = {**states.get(slot, {}), "momentum_buffer": rows["momentum"]}
