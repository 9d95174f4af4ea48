"""Mini MOT17: short sequences of textured walkers in the MOTChallenge layout (benchmarks.md §2.1).

Each sequence has walkers (upright boxes about 2.5 times as tall as wide, each with its own
colours and stripes) crossing the frame at constant velocity from either side, passing in front
of one another (a fixed depth order), entering and leaving the frame, over a textured
background; beside them the rows MOT17's ground truth also holds: a static person (class 7, a
distractor), a car (class 3, wide and grey) and far-away pedestrians with the consider flag 0.
Written as MOT17 ships:

- ``train/MOT17-XX-{DPM,FRCNN,SDP}/img1/%06d.jpg`` (the three detector folders share frames and
  ground truth), ``gt/gt.txt`` with every column (frame, id, x, y, w, h, consider, class,
  visibility: the part of the box not covered by walkers in front), ``det/det.txt`` (the
  pedestrian boxes jittered, some missed, a few false alarms, scores per detector), and
  ``seqinfo.ini``;
- ``test/MOT17-XX-{DPM,FRCNN,SDP}/`` with frames, detections and ``seqinfo.ini`` only.
"""

from __future__ import annotations

import configparser
from pathlib import Path

import cv2
import numpy as np

DETECTORS = ("DPM", "FRCNN", "SDP")
TRAIN = ("MOT17-02", "MOT17-04", "MOT17-05", "MOT17-09")
TEST = ("MOT17-01", "MOT17-03")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    small = rng.uniform(60, 200, (max(2, height // 12), max(2, width // 12), 3)).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def _walker_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A walker's appearance: a top and a bottom colour, stripes of a third on the top."""
    top, bottom, stripe = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    texture = np.empty((h, w, 3), np.float32)
    texture[: h // 2], texture[h // 2 :] = top, bottom
    period = int(rng.integers(2, 5))
    rows = np.arange(h // 2)
    texture[: h // 2][(rows // period) % 2 == 1] = stripe
    texture[: max(1, h // 6), w // 4 : w - w // 4] = (200, 170, 140)  # a head
    return texture


def _walkers(rng: np.random.Generator, count: int, frames: int, height: int, width: int) -> list[dict]:
    walkers = []
    for _ in range(count):
        h = int(rng.uniform(0.28, 0.42) * height)
        w = max(4, int(h / 2.5))
        from_left = rng.random() < 0.5
        speed = rng.uniform(1.0, 3.0) * (1 if from_left else -1)
        start = int(rng.integers(-frames // 2, frames // 2))  # when it enters
        x0 = -w if from_left else width
        walkers.append({"h": h, "w": w, "y": rng.uniform(0.1 * height, height - h - 0.05 * height), "x0": x0,
                        "start": start, "speed": speed, "drift": rng.uniform(-0.3, 0.3),
                        "texture": _walker_texture(rng, h, w)})
    return walkers


def write_sequence(folder: Path, rng: np.random.Generator, frames: int, height: int, width: int, walkers: int,
                   with_gt: bool) -> None:
    """One sequence in every detector folder named ``folder-<detector>``."""
    background = _background(rng, height, width)
    people = _walkers(rng, walkers, frames, height, width)
    static = {"x": rng.uniform(0.1, 0.8) * width, "y": rng.uniform(0.1, 0.5) * height, "h": int(0.3 * height)}
    car = {"x0": rng.uniform(0, 0.5) * width, "y": 0.72 * height, "w": int(0.3 * width), "h": int(0.16 * height), "v": 1.0}
    images, gt, boxes_by_frame = [], [], []
    for t in range(frames):
        image = background.copy()
        # The car and the static person first (behind the walkers).
        cx = car["x0"] + car["v"] * t
        x1, y1, x2, y2 = int(cx), int(car["y"]), int(cx) + car["w"], int(car["y"]) + car["h"]
        image[max(0, y1) : max(0, min(height, y2)), max(0, x1) : max(0, min(width, x2))] = (110, 110, 120)
        gt.append([t + 1, 1000, cx, car["y"], car["w"], car["h"], 0, 3, 1.0])
        sw = max(4, int(static["h"] / 2.5))
        sx, sy = int(static["x"]), int(static["y"])
        image[sy : sy + static["h"], sx : sx + sw] = (90, 60, 60)
        gt.append([t + 1, 1001, static["x"], static["y"], sw, static["h"], 1, 7, 1.0])
        gt.append([t + 1, 1002, 0.05 * width + t, 0.05 * height, 3, 8, 0, 1, 1.0])  # a far pedestrian, not considered
        occupancy = np.zeros((height, width), np.int32)  # which walker is seen where (by depth order)
        visible_boxes = []
        for k, person in enumerate(people, start=1):
            x = person["x0"] + person["speed"] * (t - person["start"])
            y = person["y"] + person["drift"] * t
            if t < person["start"] or x + person["w"] <= 0 or x >= width:
                continue
            xi, yi = int(round(x)), int(round(y))
            ys, xs = slice(max(0, yi), min(height, yi + person["h"])), slice(max(0, xi), min(width, xi + person["w"]))
            if ys.start >= ys.stop or xs.start >= xs.stop:
                continue
            patch = person["texture"][ys.start - yi : ys.stop - yi, xs.start - xi : xs.stop - xi]
            image[ys, xs] = patch
            occupancy[ys, xs] = k
            visible_boxes.append((k, x, y, person["w"], person["h"], ys, xs))
        for k, x, y, w, h, ys, xs in visible_boxes:
            visibility = float((occupancy[ys, xs] == k).sum()) / float(w * h)
            gt.append([t + 1, k, x, y, w, h, 1, 1, round(visibility, 3)])
        boxes_by_frame.append([(x, y, w, h, float((occupancy[ys, xs] == k).sum()) / float(w * h))
                               for k, x, y, w, h, ys, xs in visible_boxes])
        images.append((image + rng.normal(0, 4, image.shape)).clip(0, 255).astype(np.uint8))
    for detector_index, detector in enumerate(DETECTORS):
        root = folder.parent / f"{folder.name}-{detector}"
        (root / "img1").mkdir(parents=True, exist_ok=True)
        for t, image in enumerate(images, start=1):
            cv2.imwrite(str(root / "img1" / f"{t:06d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 92])
        detections = []
        det_rng = np.random.default_rng([detector_index, len(images)])
        for t, boxes in enumerate(boxes_by_frame, start=1):
            for x, y, w, h, visibility in boxes:
                if visibility < 0.3 or det_rng.random() < 0.1:
                    continue  # occluded or missed
                jitter = det_rng.normal(0, 1.0, 4)
                score = det_rng.uniform(0.5, 1.0) * (40 if detector == "DPM" else 1)  # DPM's scores are unnormalised
                detections.append([t, -1, x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3], score])
            if det_rng.random() < 0.1:  # a false alarm
                detections.append([t, -1, det_rng.uniform(0, width - 10), det_rng.uniform(0, height - 25), 10, 25,
                                   det_rng.uniform(0.3, 0.6)])
        (root / "det").mkdir(exist_ok=True)
        with open(root / "det" / "det.txt", "w") as f:
            for t, _, x, y, w, h, score in detections:
                f.write(f"{t},-1,{x:.1f},{y:.1f},{w:.1f},{h:.1f},{score:.3f},-1,-1,-1\n")
        if with_gt:
            (root / "gt").mkdir(exist_ok=True)
            with open(root / "gt" / "gt.txt", "w") as f:
                for frame, track, x, y, w, h, consider, cls, visibility in sorted(gt, key=lambda r: (r[1], r[0])):
                    f.write(f"{frame},{track},{x:.1f},{y:.1f},{w:.1f},{h:.1f},{consider},{cls},{visibility:g}\n")
        ini = configparser.ConfigParser()
        ini.optionxform = str
        ini["Sequence"] = {"name": root.name, "imDir": "img1", "frameRate": "30", "seqLength": str(frames),
                           "imWidth": str(width), "imHeight": str(height), "imExt": ".jpg"}
        with open(root / "seqinfo.ini", "w") as f:
            ini.write(f, space_around_delimiters=False)


def write_mot17(out: Path, seed: int = 0, frames: int = 24, height: int = 96, width: int = 160, walkers: int = 6) -> Path:
    """Mini MOT17 under ``out`` (module docstring); returns ``out``."""
    rng = np.random.default_rng([seed, 17])
    for split, names in (("train", TRAIN), ("test", TEST)):
        for i, name in enumerate(names):
            write_sequence(out / split / name, rng, frames + 2 * i, height, width, walkers + i % 2, with_gt=split == "train")
    return out
