"""Mini MS1M: synthetic 112x112 "faces" in insightface's ``faces_emore`` layout.

Written as insightface ships MS1MV2/V3 (benchmarks.md §3.1, §3.2): ``train.rec``, ``train.idx``
and ``property`` (via :func:`write_insightface_rec`), and the verification sets ``lfw.bin``,
``cfp_fp.bin`` and ``agedb_30.bin``. Each identity is a cartoon face drawn from random parameters
(skin, hair and eye colours, head shape, eye, brow, nose and mouth geometry, optional glasses and
beard, a smooth skin pattern); each image of it moves, scales and turns the face by a few
pixels/degrees in front of a random background and changes its lighting, colours and noise,
sometimes with an occluding patch. The verification identities are not among the training ones.

Learnability, measured on the default set (seed 0): a 4-conv CNN (64-d embedding, cosine softmax
s=30, m=0.2, 56x56 input) trained 15-40 epochs (a few CPU minutes) verifies the unseen identities
at 0.84-0.89 (flip-sum, 10-fold); raw pixels reach 0.63-0.67.
"""

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from datamodules.formats.recordio import write_insightface_rec
from datamodules.formats.verification_bin import write_verification_bin

SIZE = 112
VAL_SETS = ("lfw", "cfp_fp", "agedb_30")
_SCALE = 2  # faces are drawn at twice the size and downsampled, for smooth edges


def split_identities(num_identities: int, num_val_identities: int) -> tuple[range, range]:
    """Identity ids of the training set and of the verification sets, which follow (disjoint).
    The face of identity ``k`` depends only on ``seed`` and ``k``."""
    return range(num_identities), range(num_identities, num_identities + num_val_identities)


def _colour(rng: np.random.Generator, low: Sequence[float], high: Sequence[float]) -> tuple[float, ...]:
    """An RGB colour (0-255) drawn uniformly between ``low`` and ``high``."""
    return tuple(float(c) for c in rng.uniform(low, high) * 255)


def _face(seed: int, identity: int) -> np.ndarray:
    """The identity's face, (SIZE, SIZE, 4) float32: RGB premultiplied by the alpha, then the alpha."""
    rng = np.random.default_rng([seed, 0, identity])
    n = SIZE * _SCALE

    def px(value: float) -> int:
        return int(round(value * _SCALE))

    def at(*values: float) -> tuple[int, ...]:
        return tuple(px(value) for value in values)

    skin = _colour(rng, (0.35, 0.2, 0.1), (1.0, 0.85, 0.75))
    hair = _colour(rng, (0.0, 0.0, 0.0), (0.8, 0.7, 0.6))
    centre = (56 + rng.uniform(-3, 3), 60 + rng.uniform(-3, 3))
    axes = (rng.uniform(28, 40), rng.uniform(38, 50))

    def head_rows(radii: tuple[float, float], top: float, bottom: float) -> np.ndarray:
        """Mask of the ellipse around the head centre with ``radii``, rows ``top`` to ``bottom``."""
        mask = np.zeros((n, n), np.uint8)
        cv2.ellipse(mask, at(*centre), at(*radii), 0, 0, 360, 1, -1)
        mask[: px(top)] = mask[px(bottom) :] = 0
        return mask > 0

    canvas = np.zeros((n, n, 3), np.uint8)
    alpha = np.zeros((n, n), np.float32)
    # Hair: a larger ellipse behind the face down to a random length, and a fringe.
    hair_axes = (axes[0] + rng.uniform(2, 9), axes[1] + rng.uniform(2, 9))
    behind = head_rows(hair_axes, 0, centre[1] + rng.uniform(-10, 20))
    canvas[behind], alpha[behind] = hair, 1
    cv2.ellipse(canvas, at(*centre), at(*axes), 0, 0, 360, skin, -1)
    cv2.ellipse(alpha, at(*centre), at(*axes), 0, 0, 360, 1, -1)
    fringe = centre[1] - axes[1] * rng.uniform(0.35, 0.75)
    cv2.ellipse(canvas, at(centre[0], fringe), at(axes[0] * 1.05, rng.uniform(4, 14)), 0, 180, 360, hair, -1)
    # A smooth identity-specific pattern on the skin.
    pattern = cv2.resize(rng.uniform(-1, 1, (5, 5)).astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
    canvas = np.clip(canvas * (1 + 0.25 * pattern[..., None]), 0, 255).astype(np.uint8)

    eye_y, eye_dx = centre[1] - rng.uniform(0, 12), rng.uniform(11, 19)
    eye_axes, iris = (rng.uniform(4, 7), rng.uniform(2, 4)), _colour(rng, (0.0, 0.0, 0.0), (0.6, 0.6, 0.9))
    brow_dy, brow_tilt, brow_width = rng.uniform(6, 11), rng.uniform(-20, 20), int(rng.integers(1, 4))
    for side in (-1, 1):
        eye = (centre[0] + side * eye_dx, eye_y)
        cv2.ellipse(canvas, at(*eye), at(*eye_axes), 0, 0, 360, (240, 240, 240), -1)
        cv2.circle(canvas, at(*eye), px(eye_axes[1]), iris, -1)
        brow = at(eye[0], eye[1] - brow_dy)
        cv2.ellipse(canvas, brow, at(eye_axes[0] + 2, 3), side * brow_tilt, 200, 340, hair, px(brow_width))
    if rng.random() < 0.3:  # glasses
        frame, rim = _colour(rng, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), eye_axes[0] + 4
        for side in (-1, 1):
            cv2.circle(canvas, at(centre[0] + side * eye_dx, eye_y), px(rim), frame, px(2))
        bridge = eye_dx - rim
        cv2.line(canvas, at(centre[0] - bridge, eye_y), at(centre[0] + bridge, eye_y), frame, px(2))
    nose_top, nose_length, nose_width = eye_y + rng.uniform(2, 6), rng.uniform(8, 20), rng.uniform(3, 9)
    nose = [(centre[0], nose_top), (centre[0] - nose_width, nose_top + nose_length),
            (centre[0] + nose_width, nose_top + nose_length)]
    cv2.fillPoly(canvas, [np.array([at(*point) for point in nose], np.int32)], tuple(0.7 * c for c in skin))
    mouth_y = min(nose_top + nose_length + rng.uniform(6, 14), centre[1] + axes[1] - 8)
    mouth_axes, lips = (rng.uniform(7, 14), rng.uniform(1, 6)), _colour(rng, (0.4, 0.0, 0.1), (0.9, 0.4, 0.5))
    smile = 0 if rng.random() < 0.5 else 180  # lower or upper half of an ellipse
    cv2.ellipse(canvas, at(centre[0], mouth_y), at(*mouth_axes), 0, smile, smile + 180, lips, px(2))
    if rng.random() < 0.3:  # beard: the face below the mouth in the hair colour
        canvas[head_rows(axes, mouth_y + 3, SIZE)] = hair

    rgba = np.concatenate([canvas.astype(np.float32) / 255 * alpha[..., None], alpha[..., None]], axis=2)
    return cv2.resize(rgba, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


class _Camera:
    """Takes photos of faces with one random generator: pose, background, lighting, colour casts,
    sensor noise (crops of one noise field, for speed) and sometimes an occluding patch."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.noise = 0.03 * rng.standard_normal((2 * SIZE, 2 * SIZE, 3), dtype=np.float32)

    def photo(self, face: np.ndarray) -> np.ndarray:
        """An (SIZE, SIZE, 3) uint8 RGB image of a face from :func:`_face`."""
        rng = self.rng
        corners = rng.uniform(0, 1, (3, 3, 3)).astype(np.float32)
        background = cv2.resize(corners, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        pose = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), rng.uniform(-12, 12), rng.uniform(0.9, 1.1))
        pose[:, 2] += rng.uniform(-8, 8, 2)
        face = cv2.warpAffine(face, pose, (SIZE, SIZE), flags=cv2.INTER_LINEAR)
        image = background * (1 - face[..., 3:]) + face[..., :3]
        # Light from one side, contrast and per-channel gains (colour cast), brightness.
        side = 1 + rng.uniform(-0.3, 0.3) * np.linspace(-1, 1, SIZE, dtype=np.float32)
        contrast, gains = rng.uniform(0.7, 1.3), rng.uniform(0.85, 1.15, 3).astype(np.float32)
        offset = (0.5 - 0.5 * contrast + rng.uniform(-0.15, 0.15)) * gains
        image = image * (side[None, :, None] * (contrast * gains)) + offset
        if rng.random() < 0.25:
            height, width = rng.integers(15, 40, 2)
            top, left = rng.integers(0, SIZE - height), rng.integers(0, SIZE - width)
            image[top : top + height, left : left + width] = rng.uniform(0, 1, 3)
        y, x = rng.integers(0, SIZE, 2)
        image += self.noise[y : y + SIZE, x : x + SIZE]
        return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def _pairs(
    camera: _Camera, faces: Sequence[np.ndarray], num_pairs: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[bool]]:
    """``num_pairs`` pairs in random order, half of one identity (two photos), half of two."""
    rng = camera.rng
    issame = rng.permutation([True] * (num_pairs // 2) + [False] * (num_pairs - num_pairs // 2))
    pairs = []
    for same in issame:
        first, second = rng.choice(len(faces), 2, replace=False)
        pairs.append((camera.photo(faces[first]), camera.photo(faces[first if same else second])))
    return pairs, issame.tolist()


def write_ms1m(
    out: str | Path,
    num_identities: int = 64,
    images_per_identity: int = 12,
    num_val_identities: int = 40,
    num_val_pairs: int = 300,
    seed: int = 0,
) -> Path:
    """Write a mini MS1M under ``out``: ``num_identities`` training classes and the verification
    sets ``lfw``, ``cfp_fp`` and ``agedb_30`` of ``num_val_pairs`` pairs each, from
    ``num_val_identities`` other identities. The same arguments give byte-identical files."""
    if num_val_identities < 2:
        raise ValueError(f"different-identity pairs need num_val_identities >= 2; got {num_val_identities}")
    train_ids, val_ids = split_identities(num_identities, num_val_identities)
    camera = _Camera(np.random.default_rng([seed, 1]))
    faces = (_face(seed, k) for k in train_ids)
    images = [[camera.photo(face) for _ in range(images_per_identity)] for face in faces]
    root = write_insightface_rec(out, images)
    val_faces = [_face(seed, k) for k in val_ids]
    for index, name in enumerate(VAL_SETS):
        pairs, issame = _pairs(_Camera(np.random.default_rng([seed, 2, index])), val_faces, num_val_pairs)
        write_verification_bin(root / f"{name}.bin", pairs, issame)
    return root
