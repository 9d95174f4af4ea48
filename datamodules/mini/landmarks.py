"""Mini GLDv2 and mini ROxford5k: synthetic landmarks in the two official layouts (benchmarks.md §6).

A landmark is a scene drawn from random parameters (a two-colour sky/ground background and
4 to 7 coloured rectangles, ellipses and triangles, "buildings", with a stripe texture); a
photo of it is the scene seen from another viewpoint (rotation, scale, shift and a mild
perspective), under other light (brightness, contrast, a colour cast, noise), sometimes half
hidden by an occluder. Distractor scenes are drawn the same way.

- :func:`write_gldv2`: ``train.csv`` (``id,url,landmark_id``), ``train_clean.csv``
  (``landmark_id,images``: all but the last photo of each landmark, GLDv2-clean dropping noisy
  ones), images at ``<split>/<a>/<b>/<c>/<id>.jpg``, ``index.csv``, ``test.csv``,
  ``retrieval_solution_v2.1.csv`` (Public/Private queries, and non-landmark queries as Ignored
  with ``None``) and ``recognition_solution_v2.1.csv``. The index and test photos are new
  photos of a subset of the training landmarks (GLDv2's index landmarks overlap its training
  landmarks in the world, under other ids) plus distractor scenes, so a CPU run of minutes can
  learn what retrieval needs: invariance to viewpoint and light.
- :func:`write_revisited`: ``roxford5k/jpg/<name>.jpg`` and ``roxford5k/gnd_roxford5k.pkl``
  (``imlist``, ``qimlist``, ``gnd`` with ``bbx``, ``easy``, ``hard``, ``junk``): each query is a
  photo of its scene inside a larger cluttered frame, the ``bbx`` around the scene; easy
  database photos are mild views, hard ones strong views with occlusion, junk ones mostly
  occluded; plus distractors, and a ``revisitop1m/revisitop1m.txt`` of more distractors.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np

from datamodules.gldv2 import hashed_path

SIZE = 64  # photo side
_CANVAS = 96  # scenes are drawn larger, then viewed


def image_id(rng: np.random.Generator) -> str:
    """A 16-hex-character GLDv2 image id."""
    return "".join(rng.choice(list("0123456789abcdef"), 16))


def scene(seed: int, number: int) -> np.ndarray:
    """Scene ``number`` of ``seed``: (_CANVAS, _CANVAS, 3) uint8."""
    rng = np.random.default_rng([seed, 7, number])
    sky, ground = rng.uniform(40, 230, 3), rng.uniform(20, 200, 3)
    horizon = int(rng.uniform(0.45, 0.7) * _CANVAS)
    image = np.empty((_CANVAS, _CANVAS, 3), np.float32)
    image[:horizon], image[horizon:] = sky, ground
    for _ in range(int(rng.integers(4, 8))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        x, y = rng.uniform(10, _CANVAS - 10, 2)
        w, h = rng.uniform(8, 30, 2)
        kind = rng.integers(3)
        if kind == 0:
            cv2.rectangle(image, (int(x - w / 2), int(y - h)), (int(x + w / 2), int(y + h / 2)), colour, -1)
        elif kind == 1:
            cv2.ellipse(image, (int(x), int(y)), (int(w / 2), int(h / 2)), float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:
            points = np.array([[x - w / 2, y + h / 2], [x + w / 2, y + h / 2], [x, y - h]], np.int32)
            cv2.fillConvexPoly(image, points, colour)
        if rng.random() < 0.5:  # windows / stripes
            stripe = tuple(float(c) for c in rng.uniform(0, 255, 3))
            for offset in range(int(-w / 2), int(w / 2), 4):
                cv2.line(image, (int(x + offset), int(y - h / 2)), (int(x + offset), int(y + h / 3)), stripe, 1)
    return image.clip(0, 255).astype(np.uint8)


def photo(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0, occlusion: float = 0.0) -> np.ndarray:
    """A SIZE x SIZE photo of a scene: viewpoint, light, noise; ``strength`` scales the changes,
    ``occlusion`` is the fraction of the photo's width an occluder hides (0: none)."""
    centre = (_CANVAS / 2 + rng.uniform(-6, 6) * strength, _CANVAS / 2 + rng.uniform(-6, 6) * strength)
    matrix = cv2.getRotationMatrix2D(centre, rng.uniform(-12, 12) * strength, 1 + rng.uniform(-0.15, 0.2) * strength)
    viewed = cv2.warpAffine(image, matrix, (_CANVAS, _CANVAS), borderMode=cv2.BORDER_REFLECT)
    corners = np.float32([[0, 0], [_CANVAS, 0], [_CANVAS, _CANVAS], [0, _CANVAS]])
    moved = corners + rng.uniform(-6, 6, (4, 2)).astype(np.float32) * strength
    viewed = cv2.warpPerspective(viewed, cv2.getPerspectiveTransform(corners, moved), (_CANVAS, _CANVAS),
                                 borderMode=cv2.BORDER_REFLECT)
    margin = (_CANVAS - 80) // 2
    out = cv2.resize(viewed[margin:-margin, margin:-margin], (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    out = (out - 128) * (1 + rng.uniform(-0.25, 0.25) * strength) + 128 + rng.uniform(-30, 30) * strength
    out = out * (1 + rng.uniform(-0.1, 0.1, 3) * strength) + rng.normal(0, 4, out.shape)
    if occlusion > 0:
        width = int(occlusion * SIZE)
        left = int(rng.integers(0, SIZE - width + 1))
        out[:, left : left + width] = rng.uniform(0, 255, 3)
    return out.clip(0, 255).astype(np.uint8)


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


def write_gldv2(out: Path, seed: int = 0, train_landmarks: int = 40, photos_per_landmark: int = 6,
                retrieval_landmarks: int = 20, index_photos: int = 3, queries_per_landmark: int = 2,
                distractors: int = 40, non_landmark_queries: int = 6) -> Path:
    """Mini GLDv2 under ``out`` (module docstring); landmark ids are sparse (``7 * k + 3``), as
    GLDv2's are, so that a reader must remap them. Returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    landmark_ids = [7 * k + 3 for k in range(train_landmarks)]
    train_rows, clean = [], []
    for k, landmark in enumerate(landmark_ids):
        ids = [image_id(rng) for _ in range(photos_per_landmark)]
        for identifier in ids:
            _save(hashed_path(out, "train", identifier), photo(scene(seed, k), rng))
            train_rows.append(f"{identifier},http://example.org/{identifier}.jpg,{landmark}")
        clean.append(f"{landmark},{' '.join(ids[:-1])}")
    (out / "train.csv").write_text("id,url,landmark_id\n" + "\n".join(train_rows) + "\n")
    (out / "train_clean.csv").write_text("landmark_id,images\n" + "\n".join(clean) + "\n")

    index_rows: list[str] = []
    retrieval, recognition = [], []
    for k in range(retrieval_landmarks):
        gallery = [image_id(rng) for _ in range(index_photos)]
        for identifier in gallery:
            _save(hashed_path(out, "index", identifier), photo(scene(seed, k), rng))
        index_rows += gallery
        for q in range(queries_per_landmark):
            identifier = image_id(rng)
            _save(hashed_path(out, "test", identifier), photo(scene(seed, k), rng, occlusion=0.3 * (q % 2)))
            usage = "Public" if (k + q) % 3 == 0 else "Private"
            retrieval.append(f"{identifier},{' '.join(gallery)},{usage}")
            recognition.append(f"{identifier},{landmark_ids[k]},{usage}")
    for d in range(distractors):
        identifier = image_id(rng)
        _save(hashed_path(out, "index", identifier), photo(scene(seed, 10_000 + d), rng))
        index_rows.append(identifier)
    for q in range(non_landmark_queries):
        identifier = image_id(rng)
        _save(hashed_path(out, "test", identifier), photo(scene(seed, 20_000 + q), rng))
        retrieval.append(f"{identifier},None,Ignored")
        recognition.append(f"{identifier},,{'Public' if q % 2 else 'Private'}")
    (out / "index.csv").write_text("id\n" + "\n".join(index_rows) + "\n")
    (out / "test.csv").write_text("id\n" + "\n".join(row.split(",")[0] for row in retrieval) + "\n")
    (out / "retrieval_solution_v2.1.csv").write_text("id,images,Usage\n" + "\n".join(retrieval) + "\n")
    (out / "recognition_solution_v2.1.csv").write_text("id,landmarks,Usage\n" + "\n".join(recognition) + "\n")
    return out


def write_revisited(out: Path, seed: int = 0, queries: int = 10, distractors: int = 30, r1m_distractors: int = 20,
                    dataset: str = "roxford5k") -> Path:
    """Mini ROxford5k (or RParis6k with ``dataset="rparis6k"``) under ``out/<dataset>``, and
    ``out/revisitop1m`` (module docstring). Returns ``out``."""
    rng = np.random.default_rng([seed, 2])
    root = out / dataset
    imlist: list[str] = []
    gnd, qimlist = [], []

    def add(image: np.ndarray) -> int:
        name = f"{dataset}_{len(imlist):06d}"
        _save(root / "jpg" / f"{name}.jpg", image)
        imlist.append(name)
        return len(imlist) - 1

    for q in range(queries):
        number = 30_000 + q
        easy = [add(photo(scene(seed, number), rng, strength=0.5)) for _ in range(3)]
        hard = [add(photo(scene(seed, number), rng, strength=1.3, occlusion=0.25)) for _ in range(2)]
        junk = [add(photo(scene(seed, number), rng, occlusion=0.7))]
        frame = photo(scene(seed, 40_000 + q), rng)  # clutter around the landmark
        frame = cv2.resize(frame, (2 * SIZE, 2 * SIZE))
        x, y = int(rng.integers(0, SIZE)), int(rng.integers(0, SIZE))
        frame[y : y + SIZE, x : x + SIZE] = photo(scene(seed, number), rng, strength=0.5)
        name = f"{dataset}_query_{q:03d}"
        _save(root / "jpg" / f"{name}.jpg", frame)
        qimlist.append(name)
        gnd.append({"bbx": [float(x), float(y), float(x + SIZE), float(y + SIZE)], "easy": easy, "hard": hard, "junk": junk})
    for d in range(distractors):
        add(photo(scene(seed, 50_000 + d), rng))
    with open(root / f"gnd_{dataset}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)

    r1m = out / "revisitop1m"
    names = []
    for d in range(r1m_distractors):
        name = f"{d // 10:02d}/{d:07d}"
        _save(r1m / "jpg" / f"{name}.jpg", photo(scene(seed, 60_000 + d), rng))
        names.append(f"{name}.jpg")
    (r1m / "revisitop1m.txt").write_text("\n".join(names) + "\n")
    return out
