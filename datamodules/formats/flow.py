"""Optical flow files and their colour coding, as the zero-shot VOS methods read flow (HFAN,
HCPN, HGPU feed the colour-coded flow image to an RGB encoder).

- ``.flo`` (Middlebury): the float32 tag 202021.25, int32 width and height, then (u, v) float32
  pairs row by row (:func:`read_flo`, :func:`write_flo`); a wrong tag or a short file is an error
  naming the file.
- The colour wheel of Baker et al., "A Database and Evaluation Methodology for Optical Flow"
  (IJCV 2011), as the RAFT and flow_vis renderings use it (:func:`flow_to_color`): 55 hues in six
  ramps (red→yellow 15, yellow→green 6, green→cyan 4, cyan→blue 11, blue→magenta 13,
  magenta→red 6); the direction picks the hue (angle of (−u, −v)), the magnitude normalised by
  the largest in the frame desaturates towards white at zero motion; beyond the unit radius
  colours are darkened to 75 %.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FLO_TAG = 202021.25
RAMPS = (("RY", 15), ("YG", 6), ("GC", 4), ("CB", 11), ("BM", 13), ("MR", 6))


def color_wheel() -> np.ndarray:
    """The 55 colours [55, 3] (0..255, float) of the wheel, red at 0."""
    colours = []
    for name, length in RAMPS:
        ramp = np.arange(length) / length * 255
        full, zero = np.full(length, 255.0), np.zeros(length)
        colours.append({"RY": (full, ramp, zero), "YG": (255 - ramp, full, zero), "GC": (zero, full, ramp),
                        "CB": (zero, 255 - ramp, full), "BM": (ramp, zero, full), "MR": (full, zero, 255 - ramp)}[name])
    return np.concatenate([np.stack(c, axis=1) for c in colours])


def flow_to_color(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] of flow [H, W, 2] (u right, v down) on the colour wheel (module
    docstring); ``max_magnitude`` normalises (default: the frame's largest magnitude)."""
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    magnitude = np.sqrt(u * u + v * v)
    scale = max_magnitude if max_magnitude is not None else magnitude.max()
    u, v = u / (scale + 1e-5), v / (scale + 1e-5)
    wheel = color_wheel()
    radius = np.sqrt(u * u + v * v)
    angle = np.arctan2(-v, -u) / np.pi  # -1..1
    position = (angle + 1) / 2 * (len(wheel) - 1)
    k0 = np.floor(position).astype(int)
    k1 = (k0 + 1) % len(wheel)
    f = (position - k0)[..., None]
    colour = ((1 - f) * wheel[k0] + f * wheel[k1]) / 255
    inside = (radius <= 1)[..., None]
    colour = np.where(inside, 1 - radius[..., None] * (1 - colour), colour * 0.75)
    return np.floor(255 * colour).astype(np.uint8)


def read_flo(path: Path) -> np.ndarray:
    """A Middlebury ``.flo`` file as float32 [H, W, 2]."""
    data = Path(path).read_bytes()
    if len(data) < 12 or np.frombuffer(data[:4], np.float32)[0] != np.float32(FLO_TAG):
        raise ValueError(f"{path}: not a .flo file (expected the tag {FLO_TAG} in its first 4 bytes)")
    width, height = (int(x) for x in np.frombuffer(data[4:12], np.int32))
    expected = 12 + 8 * width * height
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes where a {width}x{height} flow has {expected}")
    return np.frombuffer(data[12:], np.float32).reshape(height, width, 2).copy()


def write_flo(path: Path, flow: np.ndarray) -> None:
    """``flow`` [H, W, 2] as a Middlebury ``.flo`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = flow.shape[:2]
    with open(path, "wb") as f:
        f.write(np.float32(FLO_TAG).tobytes())
        f.write(np.array([width, height], np.int32).tobytes())
        f.write(np.ascontiguousarray(flow, dtype=np.float32).tobytes())
