"""The hot-refresh curve of a model upgrade (RACT, card 7): the new model's retrieval score and the
negative flip rate as the gallery is backfilled with new features, from the ``hot_refresh@<r>/``
values that :class:`~benchmarks.metrics.retrieval.CompatibilityMetric` logs; drawn with OpenCV
into ``<run dir>/hot_refresh.png`` at the end of ``test``."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

KEY = re.compile(r"^test/hot_refresh@(?P<ratio>[0-9.]+)/(?P<metric>.+)$")
WIDTH, HEIGHT, MARGIN = 640, 400, 60
COLOURS = {"score": (200, 90, 30), "negative_flip_rate": (40, 40, 220)}  # BGR


def curves(metrics: dict[str, float]) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(ratio, value), ...] by ratio} of the logged ``test/hot_refresh@<r>/<metric>``."""
    found: dict[str, list[tuple[float, float]]] = {}
    for key, value in metrics.items():
        match = KEY.match(key)
        if match:
            found.setdefault(match["metric"], []).append((float(match["ratio"]), float(value)))
    return {metric: sorted(points) for metric, points in found.items()}


def draw_curves(lines: dict[str, list[tuple[float, float]]], title: str) -> np.ndarray:
    """A white BGR picture: the backfilled fraction 0..1 across, values 0..1 up, a polyline and
    dots per metric, its name in its colour."""
    picture = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    x0, y0, x1, y1 = MARGIN, HEIGHT - MARGIN, WIDTH - MARGIN // 2, MARGIN // 2

    def point(ratio: float, value: float) -> tuple[int, int]:
        return int(x0 + ratio * (x1 - x0)), int(y0 - min(max(value, 0.0), 1.0) * (y0 - y1))

    for tick in np.linspace(0, 1, 5):
        cv2.line(picture, point(tick, 0), point(tick, 1), (225, 225, 225), 1)
        cv2.line(picture, point(0, tick), point(1, tick), (225, 225, 225), 1)
        cv2.putText(picture, f"{tick:.2f}", (point(tick, 0)[0] - 14, y0 + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(picture, f"{tick:.2f}", (8, point(0, tick)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.rectangle(picture, (x0, y1), (x1, y0), (0, 0, 0), 1)
    cv2.putText(picture, "fraction of the gallery backfilled", (x0 + 140, HEIGHT - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1)
    cv2.putText(picture, title, (x0, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    for row, (metric, points) in enumerate(lines.items()):
        colour = COLOURS["negative_flip_rate" if metric == "negative_flip_rate" else "score"]
        pixels = np.array([point(r, v) for r, v in points], np.int32)
        cv2.polylines(picture, [pixels], False, colour, 2, cv2.LINE_AA)
        for x, y in pixels:
            cv2.circle(picture, (int(x), int(y)), 4, colour, -1, cv2.LINE_AA)
        cv2.putText(picture, metric, (x0 + 10, y1 + 20 + 18 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1)
    return picture


class HotRefreshCurve(Callback):
    """Writes ``<run dir>/hot_refresh.png`` after a ``test`` that logged a hot-refresh curve
    (a retrieval model tested with an ``old_checkpoint``); nothing otherwise."""

    file_name = "hot_refresh.png"

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        lines = curves({key: float(value) for key, value in trainer.callback_metrics.items()})
        if not lines:
            return
        path = Path(trainer.default_root_dir) / self.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), draw_curves(lines, f"hot refresh: {pl_module.method_name}"))
        rank_zero_info(f"hot-refresh curve written to {path}")
