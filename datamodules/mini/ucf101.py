"""Mini UCF101: short synthetic action videos in the official layout (benchmarks.md §4).

Five classes, each a shape that moves its own way across a textured background (the shape is
what a single frame shows, the direction what only time shows):

    Hammering         square  moving right      HandstandPushups  disc    moving up
    HammerThrow       cross   moving left       JumpingJack       ring    moving down
    JumpRope          bar     moving diagonally

The names carry the official pitfalls: ``classInd.txt`` is in case-insensitive order, which
Python's ``sorted()`` breaks twice (HammerThrow/Hammering, JumpRope/JumpingJack), and the
``HandstandPushups`` folder holds ``v_HandStandPushups_*.avi`` files. Every class has one clip
in each of the 25 groups (g01..g25); split k tests on groups 7(k−1)+1..7k, as the real lists
do, which are written with CRLF line endings like the originals. Colours, textures, sizes,
positions and speeds (about 1 to 1.5 pixels a frame) vary per video. Videos are MPEG-4 Part 2 in AVI (the codec family of the
original Xvid files), 25 fps, GOP 12 without B-frames, readable by decord and PyAV; CMD's
compressed-domain copy ``UCF-101-mpeg4/`` is made from them by the same re-encoding a user runs
on the real set (:func:`~datamodules.formats.compressed_video.reencode_tree`).
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np

from datamodules.formats.compressed_video import reencode_tree

CLASSES = {  # name in classInd order: (shape, direction (dx, dy))
    "Hammering": ("square", (1, 0)),
    "HammerThrow": ("cross", (-1, 0)),
    "HandstandPushups": ("disc", (0, -1)),
    "JumpingJack": ("ring", (0, 1)),
    "JumpRope": ("bar", (1, 1)),
}
FILE_PREFIX = {"HandstandPushups": "HandStandPushups"}  # the official folder/file mismatch
GROUPS = 25
WIDTH, HEIGHT = 96, 72
FPS = 25


def _texture(rng: np.random.Generator, height: int, width: int, base: np.ndarray) -> np.ndarray:
    """A smooth random colour texture around ``base`` (RGB 0-255)."""
    noise = cv2.resize(rng.uniform(-60, 60, (height // 6 + 2, width // 6 + 2, 3)), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + noise + rng.normal(0, 6, (height, width, 3)), 0, 255)


def _shape_mask(shape: str, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    centre, radius = size // 2, size // 2 - 1
    if shape == "square":
        mask[2:-2, 2:-2] = 1
    elif shape == "disc":
        cv2.circle(mask, (centre, centre), radius, 1, -1)
    elif shape == "ring":
        cv2.circle(mask, (centre, centre), radius, 1, max(size // 5, 2))
    elif shape == "cross":
        mask[centre - size // 6 : centre + size // 6 + 1, :] = 1
        mask[:, centre - size // 6 : centre + size // 6 + 1] = 1
    elif shape == "bar":
        mask[centre - size // 5 : centre + size // 5 + 1, :] = 1
    return mask.astype(bool)


def _frames(rng: np.random.Generator, shape: str, direction: tuple[int, int], num_frames: int) -> np.ndarray:
    background = _texture(rng, HEIGHT, WIDTH, rng.uniform(40, 215, 3))
    size = int(rng.integers(18, 27))
    sprite = _texture(rng, size, size, rng.uniform(20, 235, 3))
    mask = _shape_mask(shape, size)
    dx, dy = direction
    room = min(WIDTH - size if dx else WIDTH, HEIGHT - size if dy else HEIGHT)
    speed = rng.uniform(0.6, 0.95) * room / (num_frames - 1)  # the whole path stays inside the frame
    travel = speed * (num_frames - 1)
    x0 = rng.uniform(max(0, -dx * travel), WIDTH - size - max(0, dx * travel))
    y0 = rng.uniform(max(0, -dy * travel), HEIGHT - size - max(0, dy * travel))
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(num_frames):
        frame = background.copy()
        x, y = int(round(x0 + dx * speed * t)), int(round(y0 + dy * speed * t))
        region = frame[y : y + size, x : x + size]
        region[mask] = sprite[mask]
        frames[t] = frame.astype(np.uint8)
    return frames


def write_avi(path: Path, frames: np.ndarray, gop_size: int = 12) -> None:
    """RGB uint8 frames [T, H, W, 3] as an MPEG-4 Part 2 AVI (no B-frames)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop_size
        stream.codec_context.max_b_frames = 0
        stream.codec_context.options = {"qscale": "3"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_name(cls: str, group: int, clip: int = 1) -> str:
    """``<Class>/v_<Class>_gXX_cYY.avi`` as the split lists write it."""
    return f"{cls}/v_{FILE_PREFIX.get(cls, cls)}_g{group:02d}_c{clip:02d}.avi"


def write_ucf101(out: Path, seed: int = 0, num_frames: int = 40) -> Path:
    """Write the mini set under ``out`` (``UCF-101/`` and ``ucfTrainTestlist/``); returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for cls, (shape, direction) in CLASSES.items():
        for group in range(1, GROUPS + 1):
            write_avi(out / "UCF-101" / video_name(cls, group), _frames(rng, shape, direction, num_frames))
    failed = reencode_tree(out / "UCF-101", out / "UCF-101-mpeg4")
    if failed:
        raise RuntimeError(f"re-encoding the mini videos failed: {failed}")
    lists = out / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    crlf = lambda lines: "".join(f"{line}\r\n" for line in lines)  # noqa: E731
    (lists / "classInd.txt").write_text(crlf(f"{i} {cls}" for i, cls in enumerate(CLASSES, start=1)), newline="")
    for split in (1, 2, 3):
        test_groups = range(7 * (split - 1) + 1, 7 * split + 1)
        train = [f"{video_name(cls, g)} {i}" for i, cls in enumerate(CLASSES, start=1) for g in range(1, GROUPS + 1) if g not in test_groups]
        test = [video_name(cls, g) for cls in CLASSES for g in test_groups]
        (lists / f"trainlist0{split}.txt").write_text(crlf(train), newline="")
        (lists / f"testlist0{split}.txt").write_text(crlf(test), newline="")
    return out
