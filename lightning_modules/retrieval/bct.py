"""BCT: backward-compatible training (Shen, Xiong, Xia, Soatto, "Towards Backward-Compatible
Representation Learning", CVPR 2020; method card §6 of ``face_and_retrieval.md``).

A new embedding model is trained so that its query features can search a gallery indexed by the
old model, without re-indexing:

1. The old model (``old_checkpoint``: a :class:`~lightning_modules.retrieval.model.LandmarkRetrieval`
   run's ``last.ckpt``) is loaded frozen, in eval mode, never trained; only its classifier (class
   centres) enters the loss. Its embedding size must equal the new one.
2. The old classifier is laid over the new classes by landmark id (both runs record theirs). A
   new class the old model never saw gets, as its old-classifier row, the mean of the old
   model's L2-normalised features of its training images ("pseudo old classifier generation",
   openBCT): computed in one pass over those images before training, each rank a share, and
   cached in the run directory (``bct_class_means.pt``).
3. Influence loss: L = L_cls(w_new, φ_new) + λ · L_cls(w_old, φ_new), λ = 1, the second term the
   same margin softmax with the old centres frozen (RACT ``trainer.py``, ``comp_loss: bct``:
   ``CE(old_model.fc_classifier(feat_new), y)``). Both over model-parallel class shards.
4. Test: the compatibility table of the model upgrade (``LandmarkRetrieval`` with an old model).

Deviations from the authors' code: RACT's old classifier is a plain linear layer on the
unnormalised features; here it is the old model's cosine centres under the new model's margin
head (``old_head``: ``margin``), or without margin (``plain``: a cosine softmax at the head's scale).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.distributed.comm import all_reduce_sum
from lightning_modules.distributed.model_parallel_softmax import ModelParallelSoftmax
from lightning_modules.framework import keep_out_of_ddp
from lightning_modules.nn.margins import SoftmaxHead
from lightning_modules.retrieval.model import LandmarkRetrieval, old_centres, old_landmark_ids, rank_share

log = logging.getLogger(__name__)

CLASS_MEANS = "bct_class_means.pt"


class BackwardCompatibleTraining(LandmarkRetrieval):
    """BCT (module docstring). Takes :class:`LandmarkRetrieval`'s arguments; ``old_checkpoint``
    is required, ``influence_weight`` is λ."""

    method_name = "bct"

    def __init__(self, *args: Any, influence_weight: float = 1.0, old_head: Literal["margin", "plain"] = "margin",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.old_model is None:
            raise ValueError(f"{type(self).__name__} needs model.init_args.old_checkpoint: the last.ckpt of the old model's run")
        if old_head not in ("margin", "plain"):
            raise ValueError(f"model.old_head must be 'margin' or 'plain'; got {old_head!r}")
        self.influence_weight, self.old_head = influence_weight, old_head
        self.old_softmax: ModelParallelSoftmax | None = None

    @property
    def uses_old_classifier(self) -> bool:
        """Whether the loss needs the old classifier over the new classes (BCT's always does)."""
        return True

    def configure_model(self) -> None:
        """The new head (base class) and this rank's shard of the old classifier over the new
        classes, frozen; its rows are filled in :meth:`on_fit_start`."""
        super().configure_model()
        if self.old_softmax is not None or self.hparams.num_classes is None or not self.uses_old_classifier:
            return
        head = copy.deepcopy(self.head) if self.old_head == "margin" else SoftmaxHead(self.head.scale)
        self.old_softmax = ModelParallelSoftmax(self.hparams.num_classes, self.hparams.embedding_size, head,
                                                self.softmax_options)
        self.old_softmax.weight.requires_grad_(False)
        keep_out_of_ddp(self, ["old_softmax.weight"] + [f"old_softmax.head.{n}" for n, _ in head.named_buffers()])

    def on_fit_start(self) -> None:
        if self.old_softmax is None:
            return
        rows = self.old_classifier_rows(self.old_softmax.start, self.old_softmax.end)
        self.old_softmax.weight.data.copy_(rows.to(self.old_softmax.weight))

    def old_classifier_rows(self, start: int, end: int) -> Tensor:
        """Rows ``start``..``end`` of the frozen classifier of the influence loss (module docstring, 2)."""
        landmarks = self.trainer.datamodule.landmark_ids
        old_rows = old_centres(self.old_checkpoint)
        old_class = {landmark: c for c, landmark in enumerate(old_landmark_ids(self.old_checkpoint))}
        means = self.new_class_means([c for c, landmark in enumerate(landmarks) if landmark not in old_class])
        log.info("BCT: %d of the %d new classes are the old model's; the others use their mean old feature",
                 sum(landmark in old_class for landmark in landmarks), len(landmarks))
        return torch.stack([old_rows[old_class[landmarks[c]]] if landmarks[c] in old_class else means[c]
                            for c in range(start, end)])

    @torch.no_grad()
    def new_class_means(self, classes: list[int]) -> dict[int, Tensor]:
        """The mean old-model feature of each class of ``classes`` over its training images (one
        pass at test-time transform, each rank a share, summed over ranks), cached in the run dir."""
        cache = Path(self.trainer.default_root_dir) / CLASS_MEANS
        if cache.is_file():
            cached = torch.load(cache, weights_only=True)
            if cached["classes"].tolist() == classes:
                return dict(zip(classes, cached["means"]))
        if not classes:
            return {}
        datamodule = self.trainer.datamodule
        samples = datamodule.train_dataset.samples
        wanted = set(classes)
        indices = [i for i, (_, label) in enumerate(samples) if label in wanted]
        mine, loader = rank_share(datamodule, samples, indices)
        position = {c: i for i, c in enumerate(classes)}
        sums = torch.zeros(len(classes), self.hparams.embedding_size, device=self.device)
        counts = torch.zeros(len(classes), device=self.device)
        labels = iter([samples[i][1] for i in mine])
        for batch in loader:
            features = self.old_model.embed(batch["image"].to(self.device)).float()
            rows = torch.tensor([position[next(labels)] for _ in range(len(features))], device=self.device)
            sums.index_add_(0, rows, features)
            counts.index_add_(0, rows, torch.ones(len(rows), device=self.device))
        sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
        means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=1).cpu()
        if self.trainer.is_global_zero:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"classes": torch.tensor(classes), "means": means}, cache)
        return dict(zip(classes, means))

    def influence_weights(self, images: Tensor, labels: Tensor) -> Tensor | None:
        """Per-sample weights of the influence loss; BCT's are uniform (None)."""
        return None

    def influence_loss(self, embeddings: Tensor, batch: dict) -> Tensor:
        """The new embeddings' softmax loss under the frozen old classifier (module docstring, 3)."""
        return self.old_softmax(embeddings, batch["label"], sample_weights=self.influence_weights(batch["image"], batch["label"]))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        embeddings = self(batch["image"])
        loss_new = self.softmax(embeddings, batch["label"])
        loss_influence = self.influence_loss(embeddings, batch)
        loss = loss_new + self.influence_weight * loss_influence
        size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({"train/loss_new": loss_new, "train/loss_influence": loss_influence}, batch_size=size)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The old classifier is rebuilt from the old checkpoint (and the cached means) at every
        fit start: not saved, so the checkpoint resumes on any number of ranks."""
        checkpoint["state_dict"].pop("old_softmax.weight", None)
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.old_softmax is not None:
            checkpoint["state_dict"]["old_softmax.weight"] = self.old_softmax.weight.detach().clone()
