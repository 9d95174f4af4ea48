"""Mini MVTec AD: synthetic texture categories written in the exact MVTec AD layout.

Layout as in Bergmann et al., "MVTec AD", CVPR 2019 (see benchmarks.md §5.1):
``<category>/train/good/000.png``, ``<category>/test/<defect>/000.png`` and
``<category>/ground_truth/<defect>/000_mask.png`` (0/255). Normal images share texture
statistics but differ in phase, tilt, brightness and noise; each defect is a localized
region 6-20% of the image side, so that a normalizing flow on frozen CNN features learns
the category in about a minute on a CPU.
"""

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# An image as float32 (H, W, C) in [0, 1]; C is 3 (RGB) or 1 (grayscale).
Texture = Callable[[np.random.Generator, int], np.ndarray]


def _weave(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blue plain weave: threads over and under in a checkerboard, random phase and tilt."""
    supersample = 2
    y, x = np.mgrid[0 : size * supersample, 0 : size * supersample].astype(np.float32) / supersample
    tilt = np.deg2rad(rng.uniform(-3.0, 3.0))
    cos, sin = float(np.cos(tilt)), float(np.sin(tilt))  # Python floats keep the grid float32
    period = size / 16
    u = (cos * x + sin * y) / period + rng.uniform(0.0, 1.0)
    v = (cos * y - sin * x) / period + rng.uniform(0.0, 1.0)
    cell_u, cell_v = np.floor(u), np.floor(v)
    warp_on_top = (cell_u + cell_v) % 2 == 0
    across = np.where(warp_on_top, u - cell_u, v - cell_v)  # position across the thread on top
    along = np.where(warp_on_top, v - cell_v, u - cell_u)
    shade = 0.3 + 0.7 * np.sin(np.pi * across) ** 0.6 * (0.8 + 0.2 * np.sin(np.pi * along))
    shade = cv2.resize(shade, (size, size), interpolation=cv2.INTER_AREA)
    colour = np.array([0.35, 0.45, 0.75], np.float32) * rng.uniform(0.9, 1.1)
    return shade[..., None] * colour


def _speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gray speckle: smooth blobs plus fine grain around a jittered mid-gray."""
    coarse = cv2.GaussianBlur(rng.standard_normal((size, size), np.float32), (0, 0), size / 32)
    fine = cv2.GaussianBlur(rng.standard_normal((size, size), np.float32), (0, 0), size / 128)
    grain = 0.7 * coarse / coarse.std() + 0.3 * fine / fine.std()
    return (0.5 + rng.uniform(-0.04, 0.04) + 0.1 * grain)[..., None]


@dataclass(frozen=True)
class _Category:
    texture: Texture
    stain_colour: tuple[float, ...]
    defects: tuple[str, ...]


CATEGORIES: dict[str, _Category] = {
    "weave": _Category(_weave, (0.6, 0.4, 0.15), ("cut", "hole", "scratch", "stain")),
    # Written as mode "L" PNGs, like MVTec's grid, screw and zipper. The speckle is
    # isotropic, so a rotated patch ("cut") would not be visible.
    "speckle_gray": _Category(_speckle, (0.95,), ("hole", "scratch", "stain")),
}

DEFAULT_CATEGORIES = ("weave", "speckle_gray")


def _blob(
    rng: np.random.Generator, size: int, diameter: tuple[float, float], aspect: float, softness: float
) -> tuple[np.ndarray, tuple[float, float]]:
    """Alpha of an ellipse (diameter as fractions of the side) fading over ``softness`` px."""
    radius = rng.uniform(*diameter) * size / 2
    cx, cy = rng.uniform(radius + 2, size - radius - 2, 2)
    a, b = radius, radius * rng.uniform(aspect, 1.0)
    theta = rng.uniform(0.0, np.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    du = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    dv = (y - cy) * np.cos(theta) - (x - cx) * np.sin(theta)
    inside = 1.0 - np.sqrt((du / a) ** 2 + (dv / b) ** 2)  # 0 on the ellipse, 1 at the centre
    return np.clip(inside * radius / softness + 0.5, 0.0, 1.0), (cx, cy)


def _scratch(rng: np.random.Generator, image: np.ndarray, category: _Category) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark line segment at a random angle."""
    size = image.shape[0]
    angle = rng.uniform(0.0, np.pi)
    half = rng.uniform(0.12, 0.2) * size / 2 * np.array([np.cos(angle), np.sin(angle)])
    centre = rng.uniform(0.25, 0.75, 2) * size
    ends = [tuple(int(c) for c in np.round(centre + sign * half)) for sign in (-1, 1)]
    alpha = np.zeros((size, size), np.uint8)
    cv2.line(alpha, ends[0], ends[1], 1, thickness=max(2, round(size / 64)))
    return alpha.astype(np.float32), np.full_like(image, rng.choice([0.04, 0.96]))


def _hole(rng: np.random.Generator, image: np.ndarray, category: _Category) -> tuple[np.ndarray, np.ndarray]:
    """A dark disc."""
    alpha, _ = _blob(rng, image.shape[0], (0.08, 0.14), aspect=1.0, softness=1.0)
    return alpha, np.full_like(image, 0.03)


def _stain(rng: np.random.Generator, image: np.ndarray, category: _Category) -> tuple[np.ndarray, np.ndarray]:
    """An elliptical blob of the stain colour with soft edges; the texture shows through."""
    alpha, _ = _blob(rng, image.shape[0], (0.12, 0.2), aspect=0.6, softness=image.shape[0] / 40)
    return alpha, 0.3 * image + 0.7 * np.array(category.stain_colour, np.float32)


def _cut(rng: np.random.Generator, image: np.ndarray, category: _Category) -> tuple[np.ndarray, np.ndarray]:
    """A disc where the texture is rotated by 30-60 degrees, behind a dark seam."""
    size = image.shape[0]
    alpha, centre = _blob(rng, size, (0.14, 0.2), aspect=1.0, softness=1.0)
    turn = cv2.getRotationMatrix2D(centre, rng.uniform(30.0, 60.0) * rng.choice([-1, 1]), 1.0)
    rotated = cv2.warpAffine(category.texture(rng, size), turn, (size, size), borderMode=cv2.BORDER_REFLECT)
    seam = alpha - cv2.erode(alpha, np.ones((3, 3), np.uint8), iterations=2)
    return alpha, rotated.reshape(image.shape) * (1.0 - 0.7 * seam[..., None])


_DEFECTS = {"cut": _cut, "hole": _hole, "scratch": _scratch, "stain": _stain}


def _save(path: Path, image: np.ndarray) -> None:
    """Write a float [0, 1] (H, W, C) image as an RGB or, for one channel, mode "L" PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def _write_category(
    folder: Path, category: _Category, rng: np.random.Generator,
    image_size: int, n_train: int, n_test_good: int, n_test_per_defect: int,
) -> None:
    def normal() -> np.ndarray:
        return category.texture(rng, image_size)

    def noisy(image: np.ndarray) -> np.ndarray:
        return image + rng.normal(0.0, 0.015, image.shape).astype(np.float32)

    for index in range(n_train):
        _save(folder / "train" / "good" / f"{index:03d}.png", noisy(normal()))
    for index in range(n_test_good):
        _save(folder / "test" / "good" / f"{index:03d}.png", noisy(normal()))
    for defect in category.defects:
        for index in range(n_test_per_defect):
            image = normal()
            alpha, overlay = _DEFECTS[defect](rng, image, category)
            alpha = alpha[..., None]
            _save(folder / "test" / defect / f"{index:03d}.png", noisy(image * (1 - alpha) + overlay * alpha))
            mask = (alpha >= 0.5).astype(np.float32)
            _save(folder / "ground_truth" / defect / f"{index:03d}_mask.png", mask)


def write_mvtec(
    out: str | Path,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 48,
    n_test_good: int = 10,
    n_test_per_defect: int = 6,
) -> Path:
    """Write a mini MVTec AD under ``out``; the same seed gives byte-identical files."""
    unknown = sorted(set(categories) - CATEGORIES.keys())
    if unknown:
        raise ValueError(f"unknown mini MVTec categories {unknown}; known: {sorted(CATEGORIES)}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "readme.txt").write_text(
        "Synthetic mini MVTec AD written by visionzoo (datamodules/mini/mvtec.py), "
        f"seed {seed}, {image_size}x{image_size} px, in the MVTec AD folder layout.\n"
    )
    for name in categories:
        # One generator per category, seeded by its name, so categories do not depend on each other.
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        _write_category(root / name, CATEGORIES[name], rng, image_size, n_train, n_test_good, n_test_per_defect)
    return root
