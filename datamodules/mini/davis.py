"""Mini DAVIS: short sequences of textured objects moving over textured backgrounds, in the
DAVIS 2017 layout (benchmarks.md §1.1).

Each sequence has 1 to 3 objects (ellipses and rectangles with a stripe or dot texture of their
own colours) that move on straight paths, grow or shrink, and pass in front of one another (a
fixed depth order), over a smooth textured background. Written as DAVIS ships:
``JPEGImages/480p/<seq>/%05d.jpg``, ``Annotations/480p/<seq>/%05d.png`` (index PNGs with the
DAVIS palette, 0 background, 1..N objects by depth, a 255 void ring of one pixel around every
object as DAVIS annotators mark uncertain borders), ``Annotations_unsupervised/480p`` (the same
objects), ``ImageSets/2016|2017/{train,val}.txt``, and the forward optical flow of every frame
from the known motion (``Flow/480p/<seq>/%05d.flo`` and its colour-wheel rendering
``FlowImages/480p/<seq>/%05d.png``, the zero-shot methods' input). The frames are small (``height`` x
``width``), so that a CPU evaluates and trains in minutes.

The same renderer writes the other training data of STM and LCM (``datamodules.vos_clips``):
:func:`write_youtube_vos`, videos in YouTube-VOS's layout annotated every 5th frame (no void),
and :func:`write_image_masks`, single frames as an ``images/`` + ``masks/`` folder (stage 1).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from benchmarks.metrics.davis import VOID, write_label_map
from datamodules.formats.flow import flow_to_color, write_flo


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour texture (H, W, 3) float32 in 0..255."""
    small = rng.uniform(0, 255, (max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255)


def _object_pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An object's own appearance: two colours in stripes or dots, (H, W, 3) float32."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    rows, cols = np.mgrid[0:height, 0:width]
    period = int(rng.integers(3, 7))
    pattern = ((rows + cols) // period) % 2 if rng.random() < 0.5 else ((rows // period + cols // period) % 2)
    return np.where(pattern[..., None] == 1, a, b).astype(np.float32)


def render_sequence(rng: np.random.Generator, frames: int, height: int, width: int,
                    objects: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(RGB frame uint8, labels 0..objects, void ring bool, forward flow [H, W, 2] float32) of each
    frame of a new sequence: the flow of a visible object pixel is where the object's own motion
    (its velocity and growth) takes it in the next frame; the background does not move."""
    background = _texture(rng, height, width)
    shapes = []
    for _ in range(objects):
        shapes.append({
            "centre": rng.uniform([0.25 * height, 0.2 * width], [0.75 * height, 0.8 * width]),
            "velocity": rng.uniform(-3.0, 3.0, 2),
            "size": rng.uniform(0.12, 0.22) * min(height, width),
            "growth": rng.uniform(-0.02, 0.03),
            "ellipse": rng.random() < 0.5,
            "pattern": _object_pattern(rng, height, width),
        })
    rendered = []
    for t in range(frames):
        image = background.copy()
        labels = np.zeros((height, width), np.uint8)
        flow = np.zeros((height, width, 2), np.float32)
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        for k, shape in enumerate(shapes, start=1):  # later objects in front
            cy, cx = shape["centre"] + t * shape["velocity"]
            size = shape["size"] * (1 + shape["growth"] * t)
            ratio = (1 + shape["growth"] * (t + 1)) / (1 + shape["growth"] * t)
            mask = np.zeros((height, width), np.uint8)
            if shape["ellipse"]:
                cv2.ellipse(mask, (int(cx), int(cy)), (int(size), int(0.7 * size)), 0, 0, 360, 1, -1)
            else:
                cv2.rectangle(mask, (int(cx - size), int(cy - 0.6 * size)), (int(cx + size), int(cy + 0.6 * size)), 1, -1)
            image[mask == 1] = shape["pattern"][mask == 1]
            labels[mask == 1] = k
            vy, vx = shape["velocity"]
            flow[mask == 1, 0] = (vx + (cols - cx) * (ratio - 1))[mask == 1]
            flow[mask == 1, 1] = (vy + (rows - cy) * (ratio - 1))[mask == 1]
        ring = cv2.dilate((labels > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) - (labels > 0)
        for k in range(1, objects + 1):  # the border between two objects is uncertain too
            own = (labels == k).astype(np.uint8)
            ring |= (cv2.dilate(own, np.ones((3, 3), np.uint8)) & (labels > 0) & (labels != k)).astype(np.uint8)
        noisy = (image + rng.normal(0, 3, image.shape)).clip(0, 255).astype(np.uint8)
        rendered.append((noisy, labels, ring.astype(bool), flow))
    return rendered


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])


def write_sequence(root: Path, name: str, rng: np.random.Generator, frames: int, height: int, width: int,
                   objects: int) -> None:
    for t, (image, labels, ring, flow) in enumerate(render_sequence(rng, frames, height, width, objects)):
        annotation = np.where(ring, VOID, labels).astype(np.uint8)
        _write_jpeg(root / "JPEGImages/480p" / name / f"{t:05d}.jpg", image)
        for folder in ("Annotations", "Annotations_unsupervised"):
            write_label_map(root / folder / "480p" / name / f"{t:05d}.png", annotation)
        write_flo(root / "Flow/480p" / name / f"{t:05d}.flo", flow)
        png = root / "FlowImages/480p" / name / f"{t:05d}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(png), cv2.cvtColor(flow_to_color(flow), cv2.COLOR_RGB2BGR))


def write_youtube_vos(out: Path, seed: int = 0, videos: int = 4, annotated_frames: int = 6, height: int = 48,
                      width: int = 80) -> Path:
    """Mini YouTube-VOS ``train/`` under ``out``: JPEGImages and palette Annotations (no void) of
    every 5th frame (00000, 00005, ...) of rendered videos; returns ``out``."""
    rng = np.random.default_rng([seed, 5])
    for v in range(videos):
        rendered = render_sequence(rng, 5 * annotated_frames, height, width, objects=1 + v % 2)
        for t in range(0, len(rendered), 5):
            image, labels, _, _ = rendered[t]
            _write_jpeg(out / "train/JPEGImages" / f"video{v:02d}" / f"{t:05d}.jpg", image)
            write_label_map(out / "train/Annotations" / f"video{v:02d}" / f"{t:05d}.png", labels)
    return out


def write_image_masks(out: Path, seed: int = 0, images: int = 8, height: int = 48, width: int = 80) -> Path:
    """Single rendered frames as ``images/<name>.jpg`` and index ``masks/<name>.png`` (void
    rings kept), the static-image training folder; returns ``out``."""
    rng = np.random.default_rng([seed, 7])
    for i in range(images):
        image, labels, ring, _ = render_sequence(rng, 1, height, width, objects=1 + i % 3)[0]
        _write_jpeg(out / "images" / f"image{i:03d}.jpg", image)
        write_label_map(out / "masks" / f"image{i:03d}.png", np.where(ring, VOID, labels).astype(np.uint8))
    return out


def write_davis(out: Path, seed: int = 0, train: int = 10, val: int = 4, frames: int = 10, height: int = 48,
                width: int = 80) -> Path:
    """Mini DAVIS under ``out`` (module docstring); returns ``out``."""
    rng = np.random.default_rng([seed, 3])
    splits = {"train": [f"train-{i:02d}" for i in range(train)], "val": [f"val-{i:02d}" for i in range(val)]}
    for names in splits.values():
        for i, name in enumerate(names):
            write_sequence(out, name, rng, frames + (i % 3), height, width, objects=1 + i % 3)
    for year in ("2016", "2017"):
        for split, names in splits.items():
            path = out / "ImageSets" / year / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(names) + "\n")
    return out
