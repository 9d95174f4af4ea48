"""Mini UCF101: short synthetic action videos in the official layout (benchmarks.md §4).

Five classes, each a field of copies of one shape drifting its own way across a plain
background (the shape is what a single frame shows, the direction what only time shows; the
copies fill the frame, so any training crop shows both, as an actor fills a real UCF101 frame):

    Hammering         squares  moving right      HandstandPushups  discs  moving up
    HammerThrow       crosses  moving left       JumpingJack       rings  moving down
    JumpRope          bars     moving diagonally

The names carry the official pitfalls: ``classInd.txt`` is in case-insensitive order, which
Python's ``sorted()`` breaks twice (HammerThrow/Hammering, JumpRope/JumpingJack), and the
``HandstandPushups`` folder holds ``v_HandStandPushups_*.avi`` files. Every class has one clip
in each of the 25 groups (g01..g25); split k tests on groups 7(k−1)+1..7k, as the real lists
do, which are written with CRLF line endings like the originals. Colours (a little), sizes,
number of copies (14 to 20) and speeds (1 to 2 pixels a frame) vary per video; shapes and
background differ strongly in every colour channel, so that small models learn the classes in
minutes on a CPU. Videos are MPEG-4 Part 2 in AVI (the codec family of the original Xvid files),
25 fps, GOP 12 without B-frames, readable by decord and PyAV; CMD's compressed-domain copy
``UCF-101-mpeg4/`` is made from them by the same re-encoding a user runs on the real set
(:func:`~datamodules.prepare.mpeg4.reencode_tree`).
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np

from datamodules.prepare.mpeg4 import reencode_tree

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
COLUMNS, ROWS = 6, 4  # a grid over the frame, at most one shape copy per cell


def _smooth_texture(rng: np.random.Generator, height: int, width: int, base: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth random colour texture around ``base`` (RGB 0-255), ±``amplitude``."""
    noise = cv2.resize(rng.uniform(-amplitude, amplitude, (height // 6 + 2, width // 6 + 2, 3)), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    return np.clip(base + noise + rng.normal(0, 3, (height, width, 3)), 0, 255)


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
    # A plain dark background and bright flat sprites, each colour channel within ±15 levels of a
    # common palette: the shapes stand out by about 125 levels (they survive colour jitter and the
    # downscaling of the CPU presets), and colour stays a small nuisance next to shape and motion.
    # With colours spread widely (background 10-80, sprites 150-255 per channel, half of the videos
    # inverted), colour dominated the features of briefly trained and random backbones alike:
    # retrieval R@1 0.29 against 0.63-0.83 now (5 classes, chance 0.2).
    background_colour, sprite_colour = rng.uniform(30, 60, 3), rng.uniform(185, 215, 3)
    background = _smooth_texture(rng, HEIGHT, WIDTH, background_colour, amplitude=12)
    # A field of copies of the class's shape drifting together on a torus (leaving one side, a
    # copy comes back in on the other), so that any crop of a clip shows the shape and the motion,
    # as an actor fills a real UCF101 frame.
    size = int(rng.integers(12, 17))
    mask = _shape_mask(shape, size)
    period_x, period_y = WIDTH + size, HEIGHT + size
    cells = [(col, row) for col in range(COLUMNS) for row in range(ROWS)]
    chosen = rng.choice(len(cells), size=int(rng.integers(14, 21)), replace=False)
    cell_width, cell_height = period_x / COLUMNS, period_y / ROWS  # one copy inside each chosen cell: no overlaps
    starts = [(col * cell_width + rng.uniform(0, cell_width - size), row * cell_height + rng.uniform(0, cell_height - size))
              for col, row in (cells[i] for i in chosen)]
    speed = rng.uniform(1.0, 2.0)  # pixels a frame, along (dx, dy)
    dx, dy = direction
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(num_frames):
        frame = background.copy()
        for x0, y0 in starts:
            x = int(round(x0 + dx * speed * t)) % period_x - size  # top-left corner, from -size
            y = int(round(y0 + dy * speed * t)) % period_y - size
            visible = mask[max(0, -y) : HEIGHT - y, max(0, -x) : WIDTH - x]
            frame[max(0, y) : y + size, max(0, x) : x + size][visible] = sprite_colour
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
