"""Landmark retrieval by classification: a CNN with GeM pooling and a whitening FC, trained with a
margin softmax over the landmark classes, searched by inner product of its L2-normalised
embeddings (the common GLDv2-clean recipe; RACT's ``model/resnet_gem.py`` and ``trainer.py``).

1. A timm backbone (ResNet-50 by default) gives the last feature map; GeM pooling with a
   learnable p (init 3, Radenović et al. TPAMI 2018), the whitening FC to ``embedding_size`` with
   BatchNorm, then L2 normalisation (:class:`~lightning_modules.nn.gem.GeMEmbedding`).
2. Training: the margin head of the face stack (ArcFace, s = 30, m = 0.3 by default: RACT's
   ``config.json``) over class centres sharded across ranks
   (:class:`~lightning_modules.margin_softmax.MarginSoftmaxTraining`: GLDv2-clean's 81,313 and
   GLDv2's 203,094 classes need no rank to hold the whole head).
3. Test: the embeddings of the query and gallery eval sets (optionally multi-scale,
   ``test_scales``: features of the resized images summed then normalised; (1, 1/√2, √2) is the
   usual choice), searched with faiss and scored by the DataModule's protocol
   (:class:`~benchmarks.metrics.retrieval.RetrievalMetric`: GLDv2 mAP@100 per Public/Private,
   revisited E/M/H mAP); with ``data.recognition`` also GLDv2 recognition, GAP of the nearest
   class centre.
4. With ``old_checkpoint`` (a model upgrade), every image is also embedded by the old model,
   frozen, and the test reports the compatibility table
   (:class:`~benchmarks.metrics.retrieval.CompatibilityMetric`): self-tests, cross-test, update
   gain, negative flip rate, and the hot-refresh curve (mAP and flips as the gallery is
   backfilled). BCT (:mod:`lightning_modules.retrieval.bct`) trains with it.

Recipe defaults, RACT's ``config.json`` and ``model/build.py``: SGD lr 0.1 (for a batch of 128 a
GPU), momentum 0.9, weight decay 1e-4, one warm-up epoch from 1e-3 of the lr, a cosine to 1e-2 of
it, 30 epochs, 224-pixel crops (the DataModule's).

Deviations from the authors' code: RACT's GeM keeps p fixed at 3 and its FC has no BatchNorm;
here p is learned and the FC is followed by BatchNorm (the issue's whitening FC), both as in
the GeM papers' fine-tuning.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from benchmarks.metrics.base import BenchmarkMetric
from benchmarks.metrics.retrieval import (
    CompatibilityMetric,
    CompatibilityOptions,
    RecognitionMetric,
    RetrievalMetric,
    RetrievalProtocol,
    SearchOptions,
)
from lightning_modules.base import Stage
from lightning_modules.distributed.comm import world_info
from lightning_modules.distributed.model_parallel_softmax import SoftmaxOptions
from lightning_modules.distributed.sharded_state import SHARDS, read_checkpoint, read_rows
from lightning_modules.margin_softmax import MarginSoftmaxTraining
from lightning_modules.nn.backbones import create_backbone, freeze_
from lightning_modules.nn.gem import GeMEmbedding, multi_scale
from lightning_modules.nn.margins import CombinedMarginHead, MarginHead
from lightning_modules.recipe import OptimizerRecipe

log = logging.getLogger(__name__)

#: The checkpoint entry of the training classes' landmark ids (``GLDv2DataModule.state_dict``).
DATAMODULE_STATE = "GLDv2DataModule"


def as_options(value: Any, kind: type) -> Any:
    """A dataclass option from a config or a checkpoint, where it comes back as a dict."""
    return value if isinstance(value, kind) else kind(**value)


class LandmarkRetrieval(MarginSoftmaxTraining):
    """GeM retrieval model trained by a margin softmax (module docstring). ``num_classes`` None:
    evaluation only (no head; a checkpoint's centres are not read)."""

    #: Whether the evaluation outputs hold ``upgraded_embedding``, the old features moved into the
    #: new space (:class:`~lightning_modules.retrieval.forward_transformation.ForwardTransformation`).
    upgrades_old_gallery = False
    #: Whether they hold ``stored_embedding``, the gallery as a previous upgrade left it.
    has_stored_gallery = False

    def __init__(
        self,
        num_classes: Optional[int] = None,
        head: Optional[MarginHead] = None,
        backbone: str = "resnet50",
        pretrained: bool = True,
        weights: Optional[str] = None,
        embedding_size: int = 512,
        gem_p: float = 3.0,
        test_scales: tuple[float, ...] = (1.0,),
        old_checkpoint: Optional[str] = None,
        compatibility: CompatibilityOptions = CompatibilityOptions(),
        search: SearchOptions = SearchOptions(),
        softmax_options: SoftmaxOptions = SoftmaxOptions(),
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=0.1, lr_batch_size=128, weight_decay=1e-4, warmup_epochs=1.0, warmup_start_factor=1e-3,
            schedule="cosine", min_lr=1e-3,
        ),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["head"])
        self.head = head if head is not None else CombinedMarginHead(s=30.0, m2=0.3)
        self.softmax_options = as_options(softmax_options, SoftmaxOptions)
        self.compatibility, self.search_options = as_options(compatibility, CompatibilityOptions), as_options(search, SearchOptions)
        network = create_backbone(backbone, pretrained, weights, num_classes=0, global_pool="")
        self.embedding = GeMEmbedding(network, network.num_features, embedding_size, gem_p)
        self.test_scales = tuple(test_scales)
        self.old_model: Optional[LandmarkRetrieval] = None
        self.old_checkpoint: dict[str, Any] = {}
        if old_checkpoint is not None:
            self.old_model, self.old_checkpoint = load_old_model(old_checkpoint)
            if self.old_model.hparams.embedding_size != embedding_size:
                raise ValueError(f"model.old_checkpoint {old_checkpoint} embeds in {self.old_model.hparams.embedding_size} "
                                 f"dimensions, this model in {embedding_size}: compatible features need the same size "
                                 "(set model.embedding_size to the old model's)")
        self.retrieval_protocol: Optional[RetrievalProtocol] = None

    @property
    def method_name(self) -> str:
        return self.head.name

    @property
    def backbone(self) -> torch.nn.Module:
        """The CNN (``optim.backbone_grad_clip_norm`` clips it)."""
        return self.embedding.backbone

    def forward(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings [B, D] of images [B, 3, H, W] at their own size."""
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.embedding(images)

    def embed(self, images: Tensor) -> Tensor:
        """The test-time embedding: over ``test_scales``, summed, normalised."""
        return multi_scale(self, images, self.test_scales)

    # -------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The old model stays in its own checkpoint: a run's checkpoint holds the new model only,
        and any checkpoint can be tested against any old model."""
        for key in [k for k in checkpoint["state_dict"] if k.startswith("old_model.")]:
            del checkpoint["state_dict"][key]
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.old_model is not None:
            checkpoint["state_dict"].update({f"old_model.{k}": v for k, v in self.old_model.state_dict().items()})

    # --------------------------------------------------------------------------- evaluation

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        """Retrieval (or, with an old model, the compatibility report); GLDv2 recognition (GAP)
        too where the data asks for it (``data.recognition``) and the model has its classes."""
        datamodule = self.trainer.datamodule
        self.retrieval_protocol = datamodule.retrieval_protocol()
        if self.old_model is not None:
            metrics: list[BenchmarkMetric] = [CompatibilityMetric(self.retrieval_protocol, self.search_options, self.compatibility,
                                                                  upgraded_gallery=self.upgrades_old_gallery,
                                                                  stored_gallery=self.has_stored_gallery)]
        else:
            metrics = [RetrievalMetric(self.retrieval_protocol, self.search_options)]
        solution = getattr(datamodule, "recognition_solution", None)
        if solution is not None:
            if self.softmax is None:
                raise ValueError("data.recognition scores the model's classes, but this model has no head (num_classes null)")
            metrics.append(RecognitionMetric(self.softmax.predict, datamodule.query_ids, datamodule.landmark_ids, solution))
        return metrics

    def evaluation_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        started = time.perf_counter()
        outputs = self.embedding_outputs(batch["image"])
        if self.old_model is not None:
            outputs["old_embedding"] = self.old_model.embed(batch["image"]).float()
            if self.compatibility.refresh_order == "uncertainty":
                outputs["old_uncertainty"] = self.old_uncertainty(outputs["old_embedding"])
        if outputs["embedding"].is_cuda:
            torch.cuda.synchronize()
        self._extraction = [self._extraction[0] + time.perf_counter() - started, self._extraction[1] + len(batch["image"])]
        return outputs

    def embedding_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """What the model outputs of each evaluated image: its test-time ``embedding``."""
        return {"embedding": self.embed(images).float()}

    def old_uncertainty(self, old_features: Tensor) -> Tensor:
        """How uncertain the old model is of each of its features, for hot refresh's
        uncertainty-first backfilling: 1 − the cosine to the nearest old class centre. A
        reconstruction (RACT's measure is not published, card 7)."""
        if getattr(self, "_old_unit_centres", None) is None:
            self._old_unit_centres = torch.nn.functional.normalize(old_centres(self.old_checkpoint).float(), dim=1)
        centres = self._old_unit_centres.to(old_features.device)
        return 1.0 - (old_features @ centres.T).max(dim=1).values

    def _start(self, stage: Stage) -> None:
        super()._start(stage)
        self._extraction = [0.0, 0]  # seconds, images

    def _end(self, stage: Stage) -> None:
        seconds, images = self._extraction
        if images:
            log.info("%s: extracted %d images on this rank in %.1f s (%.2f ms an image%s)", stage, images, seconds,
                     1000 * seconds / images, ", both models" if self.old_model is not None else "")
        super()._end(stage)

    def prediction_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``visionzoo predict``: the test-time embedding of every image of the eval sets."""
        return self.embedding_outputs(batch["image"])


def rank_share(datamodule: Any, samples: Sequence[tuple[Path, int]], positions: Sequence[int]) -> tuple[list[int], DataLoader]:
    """This rank's share of ``positions`` in ``samples`` (every world-size-th, so the ranks split
    the work) and a loader of those images at the test-time transform, in that order: the old
    model's passes over training images before training (BCT's class means, AdvBCT's class
    statistics)."""
    rank, world_size = world_info()
    mine = list(positions)[rank::world_size]
    images = datamodule.evaluation_images([path for path, _ in samples])
    return mine, DataLoader(Subset(images, mine), batch_size=datamodule.batch_size, num_workers=datamodule.num_workers)


def load_old_model(path: str) -> tuple[LandmarkRetrieval, dict[str, Any]]:
    """The :class:`LandmarkRetrieval` of a visionzoo checkpoint, frozen (eval mode, no gradient),
    without its head, and the checkpoint (its centres are read by BCT through
    :func:`old_centres`). Checks that the file exists and is such a checkpoint."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.old_checkpoint {file}: no such file; expected the last.ckpt of the old "
                                "model's run (runs/gldv2/<method>/<run>/checkpoints/last.ckpt)")
    checkpoint = read_checkpoint(file, weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if "gem_p" not in hparams:
        raise ValueError(f"model.old_checkpoint {file} is not a landmark retrieval checkpoint (its hyperparameters have "
                         f"no gem_p: {sorted(hparams)[:10]})")
    settings = {**hparams, "num_classes": None, "old_checkpoint": None, "pretrained": False, "weights": None}
    model = LandmarkRetrieval(**{k: v for k, v in settings.items() if k in _init_names()})
    model.load_state_dict(checkpoint["state_dict"])
    return freeze_(model), checkpoint


def frozen_embedding(path: str, option: str, embedding_size: int) -> GeMEmbedding:
    """The embedding network of the retrieval checkpoint ``path`` (the model option ``option``),
    frozen; its size must be ``embedding_size``: the stages trained on a frozen model's features
    (the forward transformation, BEBR)."""
    model, _ = load_old_model(path)
    if model.hparams.embedding_size != embedding_size:
        raise ValueError(f"model.{option} {path} embeds in {model.hparams.embedding_size} dimensions, "
                         f"this model in {embedding_size} (set model.embedding_size to it)")
    return freeze_(model.embedding)


def _init_names() -> set[str]:
    return set(inspect.signature(LandmarkRetrieval.__init__).parameters) - {"self"}


def old_centres(checkpoint: dict[str, Any]) -> Tensor:
    """All class centres [C_old, D] of an old model's checkpoint (from its shard files)."""
    if SHARDS not in checkpoint:
        raise ValueError("the old checkpoint has no class centres (it was saved without a head)")
    num_classes = checkpoint["hyper_parameters"]["num_classes"]
    return read_rows(checkpoint[SHARDS], 0, num_classes)["weight"]


def old_landmark_ids(checkpoint: dict[str, Any]) -> list[int]:
    """The landmark id of each class of an old model's checkpoint (its DataModule's state)."""
    state = checkpoint.get(DATAMODULE_STATE)
    if not state or "landmark_ids" not in state:
        raise ValueError("the old checkpoint does not record its classes' landmark ids (it was not trained on "
                         "datamodules.gldv2.GLDv2DataModule)")
    return list(state["landmark_ids"])


torch.serialization.add_safe_globals([CompatibilityOptions, SearchOptions])
