"""MSFlow: Multi-Scale Flow-based framework for unsupervised anomaly detection.

Zhou, Xu, Song, Shen, Shen, TNNLS 2024 (arXiv 2308.15300); authors' code cool-xuan/msflow.
One model per MVTec category, trained on defect-free images only:

1. A frozen ImageNet CNN (torchvision ``wide_resnet50_2`` = timm ``wide_resnet50_2.tv_in1k``)
   gives the maps of stages 1-3 (strides 4/8/16), each smoothed by AvgPool2d(3, 2, 1).
2. Asymmetric parallel flows, one per scale (2, 5 and 8 coupling blocks), conditioned on a
   64-channel positional encoding, map each scale to a latent z_s.
3. A fusion flow couples the scales; the loss is the negative log-likelihood under N(0, I):
   ``sum_s 1/2 ||z_s||^2 - log|det J|`` per image (no division by dimension).
4. Scoring: ``log p_s = -1/2 mean_c z_s^2`` per position. Detection ("multiplicative") sums the
   upsampled log p_s, normalises by the per-image maximum and scores ``1 - P``; the image score
   is the mean of its top 3 % pixels. Localisation ("additive") sums the per-scale
   max-normalised probabilities S and scores ``max(S) - S``; pixel AUROC uses it, AU-PRO the
   multiplicative map.

Defaults are the authors' code (card "MSFlow", [CODE]): Adam lr 1e-4, 100 epochs ("25 meta-epochs
x 4 sub-epochs"), linear warm-up from 0.1x over 12 epochs and x0.33 at epochs 70 and 90, both
stepped per epoch (LinearLR chained with MultiStepLR; ``optim``,
:class:`~lightning_modules.recipe.OptimizerRecipe`), gradient norm clip 2 (a trainer setting in the config), clamp 1.9, input 512, batch 8.

Reported metrics are the last epoch's. The authors' README reports the best of 25 test-set
evaluations per class (test-set model selection); this module does not do that.
``image_auroc`` uses the paper's top-k image score; ``image_auroc_max`` uses the maximum of the
localisation map, the rule of MVTec's official evaluation script.

``evaluation_protocol`` (``results.json`` names it in its metrics' keys):

- ``official`` (default): the maps at the ground truth's resolution, AU-PRO on MVTec's exact
  curve (``aupro``), the number MVTec's evaluation script gives for the same maps.
- ``authors``: the paper's table, as the authors' ``evaluations.py``: the maps at the input
  resolution (512) against masks resized to it (nearest), AU-PRO by their 800-threshold sweep
  with a rescaled FPR axis (``aupro_sweep800``, :func:`~benchmarks.metrics.mvtec.aupro_threshold_sweep`).

Deviations from the authors' code:

- Under the bf16 presets the flows run in fp32, and so does the frozen extractor (the authors
  run both in fp32 unless AMP is asked for).
- The ``authors`` protocol resizes masks with torch's nearest rule; the authors' PIL nearest
  can differ from it on a boundary pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.metrics.base import BenchmarkMetric
from benchmarks.metrics.mvtec import AUPRO, ImageAUROC, PixelAUROC
from lightning_modules.base import EvaluatedModule, Stage
from lightning_modules.nn.backbones import create_backbone, freeze_
from lightning_modules.nn.flows import FusionFlow, ParallelFlow
from lightning_modules.recipe import OptimizerRecipe


def negative_log_likelihood(latents: Sequence[Tensor], log_det: Tensor) -> Tensor:
    """Per-image NLL under a standard normal, up to a constant: sum 1/2 ||z||^2 - log|det J|."""
    squared_norm = sum(0.5 * z.pow(2).sum(dim=(1, 2, 3)) for z in latents)
    return squared_norm - log_det


def log_likelihood_maps(latents: Sequence[Tensor]) -> list[Tensor]:
    """Per-position log-likelihood of each scale, ``-1/2 mean_c z^2`` ([B, h, w]); the Jacobian
    is not part of the score."""
    return [-0.5 * z.pow(2).mean(dim=1) for z in latents]


def _upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=True).squeeze(1)


def _per_image_max(maps: Tensor) -> Tensor:
    return maps.amax(dim=(1, 2), keepdim=True)


def multiplicative_map(log_p: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """Detection map: ``1 - exp(sum_s log p_s - per-image max)`` at ``size``."""
    total = sum(_upsample(m, size) for m in log_p)
    return 1.0 - torch.exp(total - _per_image_max(total))


def additive_map(log_p: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """Localisation map: ``max(S) - S`` with ``S = sum_s upsample(exp(log p_s - per-image max_s))``."""
    total = sum(_upsample(torch.exp(m - _per_image_max(m)), size) for m in log_p)
    return _per_image_max(total) - total


def top_k_mean(maps: Tensor, fraction: float) -> Tensor:
    """Image score: mean of the ``int(fraction * H * W)`` highest values of each map."""
    k = max(1, int(fraction * maps.shape[1] * maps.shape[2]))
    return maps.flatten(1).topk(k, dim=1).values.mean(dim=1)


class MSFlow(EvaluatedModule):
    """MSFlow on frozen multi-scale CNN features (see the module docstring for the paper)."""

    method_name = "msflow"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        pretrained: bool = True,
        weights: str | None = None,
        feature_levels: tuple[int, ...] = (1, 2, 3),
        parallel_blocks: tuple[int, ...] = (2, 5, 8),
        condition_channels: int = 64,
        clamp: float = 1.9,
        top_k: float = 0.03,
        evaluation_protocol: Literal["official", "authors"] = "official",
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=1e-4, optimizer="adam", schedule="step", milestones=(70, 90), gamma=0.33, warmup_epochs=12,
            warmup_start_factor=0.1, interval="epoch",
        ),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if evaluation_protocol not in ("official", "authors"):
            raise ValueError(f"model.evaluation_protocol must be 'official' or 'authors', got {evaluation_protocol!r}")
        if len(parallel_blocks) != len(feature_levels):
            raise ValueError(
                f"model.parallel_blocks {list(parallel_blocks)} needs one entry per feature level "
                f"{list(feature_levels)}"
            )
        self.extractor = freeze_(create_backbone(backbone, pretrained, weights, features_only=True,
                                                 out_indices=tuple(feature_levels)))
        self.smooth = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        channels = self.extractor.feature_info.channels()
        self.parallel_flows = nn.ModuleList(
            ParallelFlow(c, n, condition_channels, clamp) for c, n in zip(channels, parallel_blocks)
        )
        self.fusion_flow = FusionFlow(channels, clamp)

    def forward(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Latents of every scale after the fusion flow, and the total log|det J| per image."""
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        # Extractor and flows run in fp32 under bf16-mixed: the authors' features are fp32, and
        # exp(log-scale) and the log-det need it.
        with torch.autocast(device_type=images.device.type, enabled=False):
            features = [self.smooth(f) for f in self.extractor(images.float())]
            latents, log_det = [], images.new_zeros(images.shape[0], dtype=torch.float32)
            for flow, feature in zip(self.parallel_flows, features):
                z, flow_log_det = flow(feature)
                latents.append(z)
                log_det = log_det + flow_log_det
            latents, fusion_log_det = self.fusion_flow(latents)
        return latents, log_det + fusion_log_det

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = negative_log_likelihood(*self(batch["image"])).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = negative_log_likelihood(*self(batch["image"])).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def anomaly_maps(self, images: Tensor) -> dict[str, Tensor]:
        """Both of the paper's maps at the input resolution, and the image score."""
        latents, _ = self(images)
        log_p = log_likelihood_maps(latents)
        size = images.shape[2:]
        detection = multiplicative_map(log_p, size)
        return {
            "image_score": top_k_mean(detection, self.hparams.top_k),
            "detection_map": detection,
            "anomaly_map": additive_map(log_p, size),
        }

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        """Test: image AUROC of the paper's score and of the map's maximum (the official script's),
        pixel AUROC of the localisation map, AU-PRO of the detection map (the authors' pairing), by
        the ``evaluation_protocol``'s curve."""
        if stage == "val":
            return []
        sweep = 800 if self.hparams.evaluation_protocol == "authors" else None
        return [ImageAUROC(), ImageAUROC("image_score_max", "image_auroc_max"), PixelAUROC("anomaly_map"),
                AUPRO("detection_map", sweep_steps=sweep)]

    def evaluation_outputs(self, batch: dict) -> dict[str, Tensor]:
        """Both maps and the ground truth at one resolution, and the image scores: the ground
        truth's (``official``) or the input's (``authors``, masks resized nearest)."""
        outputs = self.anomaly_maps(batch["image"])
        mask = batch["mask"]
        if self.hparams.evaluation_protocol == "authors":
            mask = F.interpolate(mask[:, None].float(), size=batch["image"].shape[2:], mode="nearest")[:, 0].to(mask.dtype)
        size = mask.shape[1:]
        anomaly_map = _upsample(outputs["anomaly_map"], size)
        return {"anomaly_map": anomaly_map, "detection_map": _upsample(outputs["detection_map"], size), "mask": mask,
                "image_score": outputs["image_score"], "image_score_max": anomaly_map.amax(dim=(1, 2))}

    def prediction_outputs(self, batch: dict) -> dict[str, Tensor]:
        """``visionzoo predict``: both maps at the input resolution and the image score."""
        return self.anomaly_maps(batch["image"])
