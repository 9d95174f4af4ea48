"""DAVIS J&F, as the official davisvideochallenge/davis2017-evaluation computes it (benchmarks.md §1.2).

Per frame and object:

- **J** (:func:`region_similarity`): |M ∩ G| / |M ∪ G|, 1 when the union is empty; void pixels
  left out only where they are passed, which the official code does in the unsupervised task
  alone (in the semi-supervised task GT 255 counts as background).
- **F** (:func:`boundary_measure`): the boundaries of both masks by BSDS ``seg2bmap``
  (:func:`boundary_map`), each dilated by a disk of radius ceil(0.008 · image diagonal)
  (8 px at 854×480), precision and recall of one against the other's dilation, their harmonic
  mean; no thinning, no matching. Edge cases as the official code: no predicted boundary but a
  GT one → 0; a predicted one without GT → 0; neither → 1.

Per object (:func:`statistics`): Mean (``nanmean``), Recall (fraction of frames above 0.5) and
Decay (mean of the first of 4 bins minus the last; the bins share their edge frames), over the
frames 1..N-2 in the semi-supervised task (the first and last frames are not scored) and all
frames in the unsupervised one. Objects are the ids 1..max of the GT's first frame; a prediction
with an id above that is an error (the official code exits), missing ids are empty masks. In the
unsupervised task up to 20 proposals are matched to the GT objects by the Hungarian algorithm on
their sequence-averaged (J + F) / 2.

Global numbers (:func:`global_results`): means over all objects pooled across sequences (not
per sequence); J&F-Mean = (J-Mean + F-Mean) / 2. DAVIS 2016 (``year: 2016``) merges the GT
objects into one and thresholds predictions at 128 (hkchengrex/davis2016-evaluation).

``python -m benchmarks.metrics.davis DAVIS_ROOT RESULTS_DIR [--task] [--year] [--split] [--out DIR]``
scores a results folder in the official layout (``<seq>/<frame>.png``) with this code and
writes ``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` as the official
``evaluation_method.py`` does.

Deviation: the official Decay bins index with ``uint8``, which wraps for sequences longer than
255 frames; here they do not (the same numbers on DAVIS, whose sequences are at most 104 frames).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from benchmarks.metrics.base import SequenceMetric

Task = Literal["semi-supervised", "unsupervised"]
VOID = 255
MAX_PROPOSALS = 20
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def region_similarity(gt: np.ndarray, prediction: np.ndarray, void: np.ndarray | None = None) -> np.ndarray | float:
    """J of binary masks [..., H, W] (per frame when there are leading axes)."""
    gt, prediction = gt.astype(bool), prediction.astype(bool)
    keep = np.ones_like(gt) if void is None else ~void.astype(bool)
    intersection = ((gt & prediction) & keep).sum(axis=(-2, -1))
    union = ((gt | prediction) & keep).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union == 0, 1.0, intersection / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """BSDS ``seg2bmap``: 1-pixel boundaries of a binary mask [H, W], offset half a pixel toward the origin."""
    seg = mask.astype(bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def _disk(radius: int) -> np.ndarray:
    """skimage ``disk``: x² + y² <= r²."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y <= radius * radius).astype(np.uint8)


def boundary_measure(gt: np.ndarray, prediction: np.ndarray, void: np.ndarray | None = None,
                     bound_th: float = 0.008) -> float:
    """F of one frame's binary masks [H, W]."""
    keep = np.ones(gt.shape, bool) if void is None else ~void.astype(bool)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    predicted, expected = boundary_map(prediction.astype(bool) & keep), boundary_map(gt.astype(bool) & keep)
    disk = _disk(int(radius))
    predicted_dilated = cv2.dilate(predicted.astype(np.uint8), disk).astype(bool)
    expected_dilated = cv2.dilate(expected.astype(np.uint8), disk).astype(bool)
    n_predicted, n_expected = predicted.sum(), expected.sum()
    if n_predicted == 0 and n_expected > 0:
        precision, recall = 1.0, 0.0
    elif n_predicted > 0 and n_expected == 0:
        precision, recall = 0.0, 1.0
    elif n_predicted == 0 and n_expected == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = (predicted & expected_dilated).sum() / n_predicted
        recall = (expected & predicted_dilated).sum() / n_expected
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of an object's per-frame values (official ``db_statistics``)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(np.nanmean(values)) if len(values) and not np.isnan(values).all() else math.nan
    recall = float(np.nanmean(values > 0.5)) if len(values) else math.nan
    edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
    bins = [values[edges[i] : edges[i + 1] + 1] for i in range(4)]
    first, last = (float(np.nanmean(b)) if len(b) and not np.isnan(b).all() else math.nan for b in (bins[0], bins[3]))
    return mean, recall, first - last


def object_masks(labels: np.ndarray, count: int) -> np.ndarray:
    """[count, T, H, W] bool masks of the ids 1..count of label maps [T, H, W]."""
    return labels[None] == np.arange(1, count + 1)[:, None, None, None]


@dataclass
class ObjectScores:
    """One object of one sequence: its per-frame J and F (scored frames only) and statistics."""

    sequence: str
    object_id: int
    j: np.ndarray
    f: np.ndarray

    def row(self) -> dict[str, float | str]:
        jm, jr, jd = statistics(self.j)
        fm, fr, fd = statistics(self.f)
        return {"Sequence": f"{self.sequence}_{self.object_id}", "J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
                "F-Mean": fm, "F-Recall": fr, "F-Decay": fd}


def score_sequence(name: str, gt: np.ndarray, prediction: np.ndarray, task: Task = "semi-supervised",
                   year: Literal[2016, 2017] = 2017) -> list[ObjectScores]:
    """Per-object scores of a sequence from its GT label maps [T, H, W] (0 background, 1..N objects,
    255 void) and the predicted label maps [T, H, W] of the same frames (the first and last are
    ignored in the semi-supervised task)."""
    if gt.shape != prediction.shape:
        raise ValueError(f"{name}: predictions of shape {prediction.shape} for ground truth of shape {gt.shape}; "
                         "evaluate at the annotations' own resolution")
    void = gt == VOID
    gt = np.where(void, 0, gt)
    if year == 2016:  # one object: the GT's merged, the prediction a 0/255 mask thresholded at 128
        gt, prediction = (gt > 0).astype(np.uint8), (prediction > 128).astype(np.uint8)
    num_objects = int(gt[0].max())
    if task == "semi-supervised":
        gt, prediction = gt[1:-1], prediction[1:-1]
        num_predicted = int(prediction.max(initial=0))
        if num_predicted > num_objects:
            raise ValueError(f"{name}: the predictions hold object id {num_predicted}, but the first frame's annotation "
                             f"has {num_objects} objects")
        gt_masks, predicted = object_masks(gt, num_objects), object_masks(prediction, num_objects)
        return [ObjectScores(name, k + 1, region_similarity(gt_masks[k], predicted[k]),
                             np.array([boundary_measure(g, p) for g, p in zip(gt_masks[k], predicted[k])]))
                for k in range(num_objects)]
    num_predicted = int(prediction.max(initial=0))
    if num_predicted > MAX_PROPOSALS:
        raise ValueError(f"{name}: {num_predicted} proposals; the unsupervised task allows at most {MAX_PROPOSALS}")
    gt_masks = object_masks(gt, num_objects)
    predicted = object_masks(prediction, max(num_predicted, num_objects))
    j = np.stack([[region_similarity(g, p, void) for g in gt_masks] for p in predicted])  # [P, N, T]
    f = np.stack([[[boundary_measure(gf, pf, vf) for gf, pf, vf in zip(g, p, void)] for g in gt_masks] for p in predicted])
    rows, cols = linear_sum_assignment(-(j.mean(axis=2) + f.mean(axis=2)) / 2)
    matched = dict(zip(cols, rows))
    return [ObjectScores(name, k + 1, j[matched[k], k], f[matched[k], k]) for k in range(num_objects)]


def global_results(rows: Sequence[dict[str, float | str]]) -> dict[str, float]:
    """The official global table from per-object rows (:meth:`ObjectScores.row`), objects pooled."""
    mean = {column: float(np.mean([row[column] for row in rows])) for column in GLOBAL_COLUMNS[1:]}
    return {"J&F-Mean": (mean["J-Mean"] + mean["F-Mean"]) / 2, **mean}


class JAndF(SequenceMetric):
    """The official J&F as a sequence metric of the evaluation layer: per-object rows of each
    sequence (:meth:`ObjectScores.row`), then :func:`global_results`. :meth:`result_labels` turns
    a method's label maps into the official result format (0/255 masks for DAVIS 2016)."""

    def __init__(self, task: Task = "semi-supervised", year: Literal[2016, 2017] = 2017) -> None:
        self.task, self.year = task, year

    def result_labels(self, prediction: np.ndarray) -> np.ndarray:
        return np.where(prediction > 0, 255, 0).astype(np.uint8) if self.year == 2016 else prediction.astype(np.uint8)

    def sequence_rows(self, name: str, annotations: np.ndarray, prediction: np.ndarray) -> list[dict[str, float | str]]:
        return [scores.row() for scores in score_sequence(name, annotations, self.result_labels(prediction), self.task, self.year)]

    def combine_rows(self, rows: Sequence[dict[str, float | str]]) -> dict[str, float]:
        return global_results(rows)

    def tables(self, rows: Sequence[dict[str, float | str]]) -> dict[str, list[dict[str, float | str]]]:
        return {"per_object": list(rows)}


# --------------------------------------------------------------------------------- files


def read_label_map(path: Path) -> np.ndarray:
    """A DAVIS annotation or result as a label map [H, W] uint8, its values as stored; an RGB PNG
    (a colour rendering instead of an index image) is an error naming the file."""
    return _read_index_png(path)[0]


def read_annotation(path: Path) -> np.ndarray:
    """A ground-truth mask as labels [H, W] uint8 (0 background, 1..N objects, 255 void): an index
    (palette) PNG as stored; a grayscale one is a binary mask, foreground ≥ 128 → 1 (the DAVIS 2016
    package's 0/255 masks, whose 255 is the object, not void; saliency masks)."""
    labels, mode = _read_index_png(path)
    return labels if mode == "P" else (labels >= 128).astype(np.uint8)


def _read_index_png(path: Path) -> tuple[np.ndarray, str]:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected one index PNG per annotated frame")
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "1"):
            raise ValueError(f"{path}: a {image.mode} PNG; DAVIS masks are single-channel index images (mode P or L, "
                             "object ids 0..N, 255 void), not colour renderings")
        return np.array(image, dtype=np.uint8), image.mode


def sequence_names(split_file: Path) -> list[str]:
    """Sequence names of a split file: one per line (2017), or frame path pairs (2016's 480p lists)."""
    names: list[str] = []
    for line in split_file.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        name = Path(line.split()[0]).parent.name if "/" in line else line
        if name not in names:
            names.append(name)
    return names


def split_file(davis_root: Path, year: int, split: str, resolution: str = "480p") -> Path:
    """``ImageSets/<year>/<split>.txt``, or the 2016 package's ``ImageSets/<resolution>/<split>.txt``."""
    candidates = [davis_root / "ImageSets" / str(year) / f"{split}.txt", davis_root / "ImageSets" / resolution / f"{split}.txt"]
    return next((path for path in candidates if path.is_file()), candidates[0])


def davis_palette() -> list[int]:
    """The DAVIS / PASCAL VOC colour map (768 values), index 255 white as in the annotations."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    palette[3 * 255 : 3 * 256] = [255, 255, 255]
    return palette


def write_label_map(path: Path, labels: np.ndarray) -> None:
    """``labels`` [H, W] as a single-channel palette PNG with the DAVIS palette."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(davis_palette())
    image.save(path)


def score_results_folder(davis_root: Path, results: Path, task: Task = "semi-supervised", year: Literal[2016, 2017] = 2017,
                         split: str = "val", resolution: str = "480p") -> list[dict[str, float | str]]:
    """Per-object rows of every sequence of ``ImageSets/<year>/<split>.txt`` scored from
    ``results/<seq>/<frame>.png`` against the annotations."""
    annotations = davis_root / ("Annotations_unsupervised" if task == "unsupervised" else "Annotations") / resolution
    names = split_file(davis_root, year, split, resolution)
    if not names.is_file():
        raise FileNotFoundError(f"{names}: missing; expected the DAVIS split list (one sequence per line)")
    rows = []
    for sequence in sequence_names(names):
        frames = sorted(p.stem for p in (annotations / sequence).glob("*.png"))
        if not frames:
            raise FileNotFoundError(f"{annotations / sequence}: no annotations")
        scored = frames[1:-1] if task == "semi-supervised" else frames
        gt = np.stack([read_annotation(annotations / sequence / f"{frame}.png") for frame in frames])
        prediction = np.zeros_like(gt)
        for i, frame in enumerate(frames):
            if frame in scored:
                prediction[i] = read_label_map(results / sequence / f"{frame}.png")
        rows += [scores.row() for scores in score_sequence(sequence, gt, prediction, task, year)]
    return rows


def write_tables(out: Path, split: str, rows: Sequence[dict[str, float | str]]) -> tuple[Path, Path]:
    """``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` (official columns, 3 decimals)."""
    out.mkdir(parents=True, exist_ok=True)
    global_path, per_sequence_path = out / f"global_results-{split}.csv", out / f"per-sequence_results-{split}.csv"
    values = global_results(rows)
    with open(global_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(GLOBAL_COLUMNS)
        writer.writerow([f"{values[c]:.3f}" for c in GLOBAL_COLUMNS])
    with open(per_sequence_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Sequence", "J-Mean", "F-Mean"])
        writer.writerows([[row["Sequence"], f"{row['J-Mean']:.3f}", f"{row['F-Mean']:.3f}"] for row in rows])
    return global_path, per_sequence_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics.davis",
                                     description="Score DAVIS results (<seq>/<frame>.png index images) with visionzoo's "
                                                 "implementation of the official J&F.")
    parser.add_argument("davis_root")
    parser.add_argument("results_dir")
    parser.add_argument("--task", choices=["semi-supervised", "unsupervised"], default="semi-supervised")
    parser.add_argument("--year", type=int, choices=[2016, 2017], default=2017)
    parser.add_argument("--split", default="val")
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--out", help="write the two official CSV tables into this folder")
    args = parser.parse_args(argv)
    rows = score_results_folder(Path(args.davis_root), Path(args.results_dir), args.task, args.year, args.split, args.resolution)
    values = global_results(rows)
    print(f"--------------------------- Global results for {args.split} ---------------------------")
    print("  ".join(GLOBAL_COLUMNS))
    print("  ".join(f"{values[c]:.3f}".rjust(len(c)) for c in GLOBAL_COLUMNS))
    print(f"\n---------- Per sequence results for {args.split} ----------")
    for row in rows:
        print(f"{row['Sequence']}  {row['J-Mean']:.3f}  {row['F-Mean']:.3f}")
    if args.out:
        for path in write_tables(Path(args.out), args.split, rows):
            print(f"written {path}")


if __name__ == "__main__":
    main()
