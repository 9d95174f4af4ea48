"""Pictures of anomaly maps after ``test``: image | ground-truth mask | heatmap overlay."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from datamodules.formats.images import read_image


def heatmap_overlay(image: np.ndarray, scores: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET colouring of ``scores`` (already in [0, 1]) over an RGB uint8 image."""
    colours = cv2.applyColorMap(np.uint8(255 * np.clip(scores, 0, 1)), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)
    return np.uint8((1 - alpha) * image + alpha * colours)


def anomaly_panel(image: np.ndarray, mask: np.ndarray, scores: np.ndarray, title: str) -> np.ndarray:
    """image | mask | overlay side by side, at the resolution of ``scores``, with a title bar."""
    height, width = scores.shape
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    mask_rgb = np.repeat(np.uint8(mask > 0)[..., None] * 255, 3, axis=2)
    panel = np.concatenate([image, mask_rgb, heatmap_overlay(image, scores)], axis=1)
    bar = np.full((max(20, height // 12), panel.shape[1], 3), 255, np.uint8)
    scale = bar.shape[0] / 40
    cv2.putText(bar, title, (4, int(bar.shape[0] * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(1, round(scale * 2)))
    return np.concatenate([bar, panel], axis=0)


class AnomalyMapImages(Callback):
    """Saves up to ``per_defect_type`` test images of every defect type (and of ``good``) as
    PNG panels into ``<run dir>/<directory>``. Heatmaps share one colour scale: the minimum and
    maximum over the whole test set, so panels can be compared with each other.

    Reads ``anomaly_map`` (and ``image_score`` when present) from ``test_step``'s output and
    ``mask``, ``path``, ``defect_type`` from the batch."""

    def __init__(self, per_defect_type: int = 2, directory: str = "anomaly_maps") -> None:
        self.per_defect_type = per_defect_type
        self.directory = directory
        self._reset()

    def _reset(self) -> None:
        self._kept: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._low, self._high = np.inf, -np.inf

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        maps = outputs["anomaly_map"].detach().float()
        self._low = min(self._low, float(maps.min()))
        self._high = max(self._high, float(maps.max()))
        scores = outputs.get("image_score")
        for i, defect_type in enumerate(batch["defect_type"]):
            if len(self._kept[defect_type]) < self.per_defect_type:
                self._kept[defect_type].append({
                    "path": batch["path"][i],
                    "map": maps[i].cpu().numpy(),
                    "mask": batch["mask"][i].cpu().numpy(),
                    "score": None if scores is None else float(scores[i]),
                })

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = Path(trainer.default_root_dir) / self.directory
        directory.mkdir(parents=True, exist_ok=True)
        span = max(self._high - self._low, 1e-12)
        for defect_type, items in self._kept.items():
            for item in items:
                path = Path(item["path"])
                title = f"{defect_type}/{path.name}" + ("" if item["score"] is None else f"  score {item['score']:.3g}")
                panel = anomaly_panel(read_image(path), item["mask"], (item["map"] - self._low) / span, title)
                cv2.imwrite(str(directory / f"{defect_type}_{path.stem}.png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        rank_zero_info(f"anomaly-map pictures written to {directory}")
