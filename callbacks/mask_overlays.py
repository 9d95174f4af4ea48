"""Pictures of video object segmentation after ``test``: for each sequence, PNG panels of a few
frames (frame | its optical flow where the method reads flow | prediction overlay |
ground-truth overlay, objects in the DAVIS palette's colours, void in white) and an animated GIF of the prediction overlay over all frames, in
``<run dir>/<directory>/<seq>/``. Each rank draws the sequences it evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from benchmarks.metrics.davis import davis_palette

PALETTE = np.array(davis_palette(), dtype=np.uint8).reshape(256, 3)


def mask_overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The frame [H, W, 3] with each labelled pixel (1..254, and 255 void) blended with its colour."""
    coloured = PALETTE[labels]
    blend = np.where((labels > 0)[..., None], (1 - alpha) * frame + alpha * coloured, frame)
    return blend.astype(np.uint8)


def sequence_panel(frame: np.ndarray, prediction: np.ndarray, annotation: np.ndarray, title: str,
                   flow: np.ndarray | None = None) -> np.ndarray:
    """frame | flow image (when given) | prediction overlay | ground-truth overlay, with a title bar."""
    parts = [frame] + ([flow] if flow is not None else []) + [mask_overlay(frame, prediction), mask_overlay(frame, annotation)]
    panel = np.concatenate(parts, axis=1)
    bar = np.full((max(16, frame.shape[0] // 12), panel.shape[1], 3), 255, np.uint8)
    scale = bar.shape[0] / 40
    cv2.putText(bar, title, (4, int(bar.shape[0] * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(1, round(scale * 2)))
    return np.concatenate([bar, panel], axis=0)


class MaskOverlays(Callback):
    """``frames_per_sequence`` evenly spaced panels per sequence and, with ``animation``, a GIF
    of the prediction overlay at ``fps`` frames per second (module docstring)."""

    def __init__(self, frames_per_sequence: int = 3, animation: bool = True, fps: int = 6,
                 directory: str = "mask_overlays") -> None:
        self.frames_per_sequence, self.animation, self.fps, self.directory = frames_per_sequence, animation, fps, directory

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if outputs is None:
            return
        folder = Path(trainer.default_root_dir) / self.directory / outputs["name"]
        folder.mkdir(parents=True, exist_ok=True)
        frames, prediction, annotations = batch.frames, outputs["prediction"], batch.annotations
        chosen = np.unique(np.linspace(0, len(frames) - 1, self.frames_per_sequence).round().astype(int))
        for t in chosen:
            flows = getattr(batch, "flows", None)
            panel = sequence_panel(frames[t], prediction[t], annotations[t],
                                   f"{outputs['name']} {outputs['frame_names'][t]}: " + ("flow | " if flows is not None else "")
                                   + "prediction | ground truth", flows[t] if flows is not None else None)
            cv2.imwrite(str(folder / f"{outputs['frame_names'][t]}.png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        if self.animation:
            images = [Image.fromarray(mask_overlay(frame, labels)) for frame, labels in zip(frames, prediction)]
            images[0].save(folder / f"{outputs['name']}.gif", save_all=True, append_images=images[1:],
                           duration=int(1000 / self.fps), loop=0)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(f"mask overlays written to {Path(trainer.default_root_dir) / self.directory}")
