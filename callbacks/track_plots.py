"""Pictures of multi-object tracking after ``test``: for the first ``sequences`` sequences a
rank tracks, PNGs of a few frames with every output box drawn in its track's colour, its id, and
a trail of its last centres, beside the ground-truth pedestrians in white (where the sequence
has ground truth), and an MP4 of all frames (OpenCV's ``mp4v``; a GIF where no MP4 writer
opens), in ``<run dir>/<directory>/<seq>/``."""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from datamodules.mot17 import pedestrian_rows


def track_colour(track_id: int) -> tuple[int, int, int]:
    """A stable, well-spread RGB colour of an id (golden-ratio hues)."""
    hue = int((track_id * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 220, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def draw_tracks(frame: np.ndarray, rows: np.ndarray, trails: dict[int, deque], ground_truth: np.ndarray | None) -> np.ndarray:
    """``frame`` RGB with ground-truth boxes (white, thin), then each track's trail, box and id."""
    image = frame.copy()
    thickness = max(1, round(min(frame.shape[:2]) / 300))
    if ground_truth is not None:
        for x, y, w, h in ground_truth[:, 2:6]:
            cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (255, 255, 255), 1)
    for track_id, x, y, w, h, _ in rows:
        colour = track_colour(int(track_id))
        points = list(trails[int(track_id)])
        for a, b in zip(points, points[1:]):
            cv2.line(image, a, b, colour, thickness)
        cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), colour, thickness + 1)
        cv2.putText(image, str(int(track_id)), (int(x), max(8, int(y) - 2)), cv2.FONT_HERSHEY_SIMPLEX,
                    max(0.3, min(frame.shape[:2]) / 800), colour, thickness)
    return image


class TrackPlots(Callback):
    """``frames_per_sequence`` PNGs and a video (``fps``) for each of the first ``sequences``
    sequences of each rank, trails of ``trail`` frames (module docstring)."""

    def __init__(self, sequences: int = 2, frames_per_sequence: int = 3, trail: int = 30, fps: int = 15,
                 directory: str = "track_plots") -> None:
        self.sequences, self.frames_per_sequence, self.trail, self.fps = sequences, frames_per_sequence, trail, fps
        self.directory, self.drawn = directory, 0

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.drawn = 0

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if outputs is None or self.drawn >= self.sequences:
            return
        self.drawn += 1
        folder = Path(trainer.default_root_dir) / self.directory / outputs["name"]
        folder.mkdir(parents=True, exist_ok=True)
        tracks, gt = outputs["prediction"], batch.annotations.ground_truth
        gt = pedestrian_rows(gt) if gt is not None else None
        chosen = set(np.unique(np.linspace(0, len(batch.frames) - 1, self.frames_per_sequence).round().astype(int)).tolist())
        trails: dict[int, deque] = defaultdict(lambda: deque(maxlen=self.trail))
        pictures = []
        for t in range(len(batch.frames)):
            rows = tracks[tracks[:, 0] == t + 1][:, 1:]
            for track_id, x, y, w, h, _ in rows:
                trails[int(track_id)].append((int(x + w / 2), int(y + h)))
            image = draw_tracks(batch.frame(t), rows, trails, gt[gt[:, 0] == t + 1] if gt is not None else None)
            pictures.append(image)
            if t in chosen:
                cv2.imwrite(str(folder / f"{batch.frame_names[t]}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        self._write_video(folder / outputs["name"], pictures)

    def _write_video(self, stem: Path, pictures: list[np.ndarray]) -> None:
        height, width = pictures[0].shape[:2]
        writer = cv2.VideoWriter(str(stem.with_suffix(".mp4")), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
        if writer.isOpened():
            for picture in pictures:
                writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            writer.release()
            return
        images = [Image.fromarray(picture) for picture in pictures]
        images[0].save(stem.with_suffix(".gif"), save_all=True, append_images=images[1:], duration=int(1000 / self.fps), loop=0)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(f"track plots written to {Path(trainer.default_root_dir) / self.directory}")
