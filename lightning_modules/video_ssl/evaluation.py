"""UCF101 evaluation of self-supervised video representations (benchmarks.md §4.2; method cards
§0 "UCF101 / HMDB51"): linear probe, fine-tuning and clip retrieval of a pretrained backbone.

Every video pretraining method keeps its clip encoder as ``self.backbone`` (a
:class:`~lightning_modules.nn.video_encoder.VideoEncoder`), so :func:`load_backbone` takes the
``backbone.*`` weights of any pretraining run's Lightning checkpoint
(``--model.init_args.pretrained_checkpoint runs/ucf101/<method>/split1/checkpoints/last.ckpt``).
The backbone name must be the one the pretraining used.

- :class:`VideoClassifier` with ``freeze_backbone=True``, the **linear probe**: the backbone is
  frozen and kept in eval mode (BatchNorm uses its running statistics), one linear layer is
  trained on its pooled last-layer feature. With ``freeze_backbone=False``, **fine-tuning**
  (CMD's recipe, method card §8 (5) [CODE*]: dropout 0.3, SGD Nesterov, linear warm-up,
  cosine decay). Validation reports clip-level top-1 (``val/clip_top1``); test reports
  clip-level (``test/clip_top1``) and video-level top-1 (``test/video_top1``: the softmax
  averaged over the ``data.test_clips`` uniformly spaced centre-cropped clips of each video,
  VCOP/CMD).
- :class:`ClipRetrieval`: no training, ``visionzoo test`` only. Split-1 test videos query
  split-1 train videos (VCOP ``retrieve_clips.py``).

Under DDP each rank sees a share of the evaluation clips, padded with repeats by the
``DistributedSampler``; the evaluation layer (:mod:`lightning_modules.base`) gathers the
per-clip outputs of every rank and keeps one row per clip, so the metrics equal the
single-process ones. The sets are found by name (``val``, ``test``, ``gallery``), never by
loader position.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.metrics.base import BenchmarkMetric
from benchmarks.metrics.video import RETRIEVAL_KS, ClipTop1, RetrievalRecall, VideoTop1
from lightning_modules.base import EvaluatedModule, Stage
from lightning_modules.framework import read_checkpoint
from lightning_modules.nn.backbones import freeze_
from lightning_modules.nn.video_encoder import VideoEncoder
from lightning_modules.recipe import OptimizerRecipe

BACKBONE_PREFIX = "backbone."


def load_backbone(encoder: VideoEncoder, checkpoint: str) -> None:
    """Load the ``backbone.*`` weights of the Lightning checkpoint ``checkpoint`` (its
    ``state_dict``; a bare state dict is read as is) into ``encoder``, strictly: every key and
    shape must match, otherwise the error names the checkpoint and lists what differs."""
    content = read_checkpoint(checkpoint)  # weights_only: a user-given file runs no code
    state = content.get("state_dict", content) if isinstance(content, dict) else {}
    weights = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    if not weights:
        names = ", ".join(list(state)[:5]) or "none"
        raise ValueError(
            f"{checkpoint}: no '{BACKBONE_PREFIX}*' weights (first keys: {names}); expected the checkpoint of a "
            "visionzoo video pretraining run, whose clip encoder is `self.backbone`"
        )
    expected = encoder.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    mismatched = sorted(
        f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected.keys() & weights.keys()
        if weights[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", mismatched))
            if keys
        ]
        raise ValueError(
            f"{checkpoint}: its '{BACKBONE_PREFIX}*' weights do not fit backbone '{encoder.name}'; "
            f"{'; '.join(problems)}. Is --model.init_args.backbone the backbone the pretraining used?"
        )
    encoder.load_state_dict(weights)


def pretrained_encoder(name: str, pretrained: bool, weights: str | None, checkpoint: str | None) -> VideoEncoder:
    """A protocol's clip encoder: ``VideoEncoder(name, pretrained, weights)``, then the
    ``backbone.*`` weights of the pretraining run's ``checkpoint`` where one is given."""
    encoder = VideoEncoder(name, pretrained, weights)
    if checkpoint is not None:
        load_backbone(encoder, checkpoint)
    return encoder


class ClipFeaturePredictions:
    """``visionzoo predict`` of a clip encoder (the ``forward`` of every video method but the
    classifier): the pooled backbone feature of each clip, ``features`` [B, D]."""

    def prediction_outputs(self, batch: dict) -> dict[str, Tensor]:
        return {"features": self(batch["video"]).float()}


# --------------------------------------------------------------------------- classification


class VideoClassifier(EvaluatedModule):
    """Linear probe (``freeze_backbone=True``) or fine-tuning of a pretrained clip encoder on
    UCF101 (module docstring).

    Head: dropout, then one linear layer on the backbone's pooled feature; with
    ``feature_batchnorm`` the feature first goes through a BatchNorm without affine parameters
    (the linear probe of MAE, He et al., CVPR 2022: once its statistics are fixed it is a linear
    map that the classifier absorbs, and it makes the learning rate independent of the scale of
    the pretrained features, which differs from method to method). Optimiser (``optim``,
    :class:`~lightning_modules.recipe.OptimizerRecipe`): SGD with weight decay on every trained
    parameter; the learning rate rises linearly from ``warmup_start_factor`` × ``lr`` to ``lr``
    over ``warmup_epochs`` and then follows a cosine down to ``min_lr`` at the end of training
    (per step). The rates are for a global batch of ``lr_batch_size`` clips and scale linearly
    with the run's global batch (devices × batch × accumulation; ``None``: used as given): a linear layer on standardised D-dimensional features
    moves a clip's logits by about lr·D/batch per step (more with momentum), so the probe's lr 0.1
    for batch 64 diverges unscaled at the mini preset's batch 8. The defaults are CMD's
    fine-tuning recipe (method card §8 (5) [CODE*], read in a copy of the code, which scales the
    same way): dropout 0.3, lr 1e-4 × batch 8 = 8e-4, Nesterov momentum 0.9, weight decay 3e-3,
    10 warm-up epochs from 4e-6 × 8, cosine to 1e-6 (scaled here too), 120 epochs (trainer).
    CMD's ±10° rotation augmentation is not applied (the DataModule's default sampler: random
    crop of area 0.2-1 and flip).

    ``pretrained``/``weights`` start a timm 2-D backbone from its ImageNet weights;
    ``pretrained_checkpoint`` loads ``backbone.*`` from a pretraining run (:func:`load_backbone`).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "r2plus1d_10",
        pretrained: bool = False,
        weights: str | None = None,
        pretrained_checkpoint: str | None = None,
        freeze_backbone: bool = False,
        feature_batchnorm: bool = False,
        dropout: float = 0.3,
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=8e-4, lr_batch_size=8, nesterov=True, weight_decay=3e-3, warmup_epochs=10.0,
            warmup_start_factor=3.2e-5 / 8e-4, min_lr=1e-6,
        ),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = pretrained_encoder(backbone, pretrained, weights, pretrained_checkpoint)
        if freeze_backbone:  # in eval mode for good: BatchNorm uses its running statistics, never updates them
            freeze_(self.backbone)
        width = self.backbone.num_features
        self.head = nn.Sequential(
            nn.BatchNorm1d(width, affine=False) if feature_batchnorm else nn.Identity(),
            nn.Dropout(dropout),
            nn.Linear(width, num_classes),
        )

    @property
    def method_name(self) -> str:
        return "linear_probe" if self.hparams.freeze_backbone else "finetune"

    def forward(self, video: Tensor) -> Tensor:
        """Class logits [B, num_classes] of clips [B, 3, T, H, W]."""
        return self.head(self.features(video))

    def features(self, video: Tensor) -> Tensor:
        """Pooled backbone features [B, D]; without gradient when the backbone is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_backbone):
            return self.backbone(video)

    def prediction_outputs(self, batch: dict) -> dict[str, Tensor]:
        """``visionzoo predict``: each clip's pooled backbone ``features`` and class ``logits``."""
        features = self.features(batch["video"])
        return {"features": features.float(), "logits": self.head(features).float()}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self(batch["video"])
        loss = F.cross_entropy(logits, batch["label"])
        batch_size = len(batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/clip_top1", (logits.argmax(1) == batch["label"]).float().mean(), batch_size=batch_size)
        return loss

    # ----------------------------------------------------------------------------- evaluation

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        """Validation: clip top-1 (one clip per video); test: clip and video top-1."""
        return [ClipTop1()] if stage == "val" else [ClipTop1(), VideoTop1()]

    def evaluation_outputs(self, batch: dict) -> dict[str, Tensor]:
        return {"logits": self(batch["video"]).float()}


# --------------------------------------------------------------------------- retrieval

class ClipRetrieval(ClipFeaturePredictions, EvaluatedModule):
    """Video retrieval R@k of a pretrained backbone, without training (``visionzoo test`` only;
    the DataModule needs ``test_gallery: true``).

    Protocol variant (benchmarks.md §4.2, written into ``results.json`` through the config):
    queries are the split's **test** videos, the gallery its **train** videos; a video's feature
    is the mean of the **pooled last-layer backbone features** (CoCLR's feature layer, not VCOP's
    max-pooled conv5) of its ``data.test_clips`` uniformly spaced centre-cropped clips (VCOP: 10);
    with ``center`` (CoCLR) each set's own mean feature is subtracted, then features are
    L2-normalised and ranked by cosine similarity (``center=False``: VCOP's cosine distance).
    R@k is hit@k: the fraction of queries with a video of their class among the top k, logged as
    ``test/R@<k>``. No video is dropped (VCOP's ``drop_last`` is not replicated).
    """

    method_name = "retrieval"

    def __init__(
        self,
        backbone: str = "r2plus1d_10",
        pretrained: bool = False,
        weights: str | None = None,
        pretrained_checkpoint: str | None = None,
        center: bool = True,
        ks: tuple[int, ...] = RETRIEVAL_KS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = pretrained_encoder(backbone, pretrained, weights, pretrained_checkpoint)

    def forward(self, video: Tensor) -> Tensor:
        """Pooled backbone features [B, D] of clips [B, 3, T, H, W]."""
        return self.backbone(video)

    def on_test_start(self) -> None:
        if "gallery" not in self.trainer.datamodule.eval_set_names("test"):
            raise ValueError("clip retrieval needs the train list as gallery: set data.init_args.test_gallery true")

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        return [RetrievalRecall("test", "gallery", ks=self.hparams.ks, center=self.hparams.center)]

    def evaluation_outputs(self, batch: dict) -> dict[str, Tensor]:
        return {"features": self(batch["video"]).float()}
