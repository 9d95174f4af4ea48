"""Official MVTec AD pixel metrics: AU-PRO and pixel AUROC.

Definitions follow the MVTec AD evaluation code (2021 release, ``pro_curve_util.compute_pro``
and ``generic_util.trapezoid``; Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021):

- **AU-PRO**: the ground-truth masks are split into connected components with 8-connectivity, per
  image, and the components of all images are pooled. At every distinct score t,
  FPR(t) = #normal pixels with score >= t / #normal pixels, over all label-0 pixels of all images
  (good images included), and PRO(t) = mean over components of the fraction of the component with
  score >= t. The curve is integrated with the trapezoid rule up to FPR = 0.3, ending with a
  linearly interpolated segment at exactly 0.3, and divided by 0.3.
- **Pixel AUROC** (not in the 2021 script, standard since the MVTec AD paper): one ROC over all
  pixels of all images pooled.
- **Image AUROC**: ROC AUC of one score per image against "the GT has a defect pixel". The
  official script's image score is the max of each anomaly map; methods may add their own.
  Both AUROCs here are sklearn's exact rank-based ones: torchmetrics' ``BinaryAUROC`` applies a
  sigmoid to scores outside [0, 1], which saturates (and so ties) large float32 scores.

Pitfalls guarded against (see benchmarks.md §5.4): PRO averaged per image instead of over pooled
components; FPR without the good images; 4-connectivity; no normalisation by the limit, or
normalising by the last FPR reached instead of interpolating to exactly the limit; binned
thresholds, and tied scores not merged into one curve point; masks of 0/255 (positive means > 0);
the sigmoid saturation of torchmetrics' AUROC (pixel AUROC here is sklearn's rank-based one).
Scores are compared at the resolution they are given in: the official protocol is full GT size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from torch import Tensor

from benchmarks.metrics.base import EvalSetMetric, Rows

ArrayLike = np.ndarray | Tensor

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _to_numpy(array: ArrayLike) -> np.ndarray:
    """A numpy view of ``array`` where possible (bfloat16 has no numpy type and becomes float32)."""
    if isinstance(array, Tensor):
        array = array.detach().cpu()
        return (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    return np.asarray(array)


def _check_shapes(anomaly_maps: ArrayLike, masks: ArrayLike) -> None:
    if anomaly_maps.ndim != 3 or tuple(anomaly_maps.shape) != tuple(masks.shape):
        raise ValueError(
            "anomaly_maps and masks must both be shaped [N, H, W]; got "
            f"{tuple(anomaly_maps.shape)} and {tuple(masks.shape)}"
        )


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1]; got {fpr_limit}")


def _split_pixels(anomaly_maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The scores of the normal pixels (ascending), of the defect pixels (ascending) with their
    weights 1 / |their 8-connected ground-truth component| (so that summing weights counts
    components fractionally), and the number of components. ``anomaly_maps`` and ``masks`` are
    shaped [N, H, W]; a mask pixel is a defect where its value is > 0."""
    maps, masks = _to_numpy(anomaly_maps), _to_numpy(masks)
    _check_shapes(maps, masks)
    if np.isnan(maps).any():
        raise ValueError("anomaly_maps contain NaN")
    normal = np.empty(maps.size, dtype=maps.dtype)
    n_normal = 0
    defect_scores, defect_weights = [], []
    n_components = 0
    for score_map, mask in zip(maps, masks):
        components, n = ndimage.label(mask > 0, structure=_EIGHT_CONNECTED)
        is_normal = components == 0
        count = np.count_nonzero(is_normal)
        normal[n_normal : n_normal + count] = score_map[is_normal]
        n_normal += count
        defect_labels = components[~is_normal]
        defect_scores.append(score_map[~is_normal])
        defect_weights.append(1.0 / np.bincount(defect_labels)[defect_labels])
        n_components += n
    if n_components == 0:
        raise ValueError("masks contain no defect pixels: AU-PRO needs at least one GT component")
    if n_normal == 0:
        raise ValueError("masks contain no normal pixels: the false positive rate is undefined")
    normal = normal[:n_normal]
    normal.sort()
    defect = np.concatenate(defect_scores)
    order = np.argsort(defect)
    return normal, defect[order], np.concatenate(defect_weights)[order], n_components


def pro_curve(anomaly_maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve ``(fpr, pro)`` of MVTec's ``compute_pro``, from (0, 0) to (1, 1).

    One point per distinct score t, in order of decreasing t (so both arrays are non-decreasing),
    counting all pixels with score >= t: tied scores give one point. ``anomaly_maps`` and ``masks``
    are shaped [N, H, W]; a mask pixel is a defect where its value is > 0.
    """
    normal, defect, weights, n_components = _split_pixels(anomaly_maps, masks)
    n_normal = normal.size
    # weight_at_or_above[i] = sum of the weights of defect[i:], accumulated from the top score down.
    weight_at_or_above = np.append(np.cumsum(weights[::-1])[::-1], 0.0)

    thresholds = np.union1d(normal, defect)  # ascending; the curve runs from the last one down
    fpr = np.empty(thresholds.size + 2)
    pro = np.empty(thresholds.size + 2)
    fpr[0] = pro[0] = 0.0
    fpr[-1] = pro[-1] = 1.0
    normal_at_or_above = n_normal - np.searchsorted(normal, thresholds, side="left")
    np.divide(normal_at_or_above[::-1], n_normal, out=fpr[1:-1])
    del normal_at_or_above
    pro_sum = weight_at_or_above[np.searchsorted(defect, thresholds, side="left")]
    np.divide(pro_sum[::-1], n_components, out=pro[1:-1])
    np.minimum(pro, 1.0, out=pro)  # the float sum of 1/|component| can overshoot 1 by rounding
    return fpr, pro


def aupro_threshold_sweep(anomaly_maps: ArrayLike, masks: ArrayLike, steps: int = 800, fpr_limit: float = 0.3) -> float:
    """AU-PRO as MSFlow's ``evaluations.py`` (``eval_seg_pro``; a sweep many anomaly-detection
    repositories share), not MVTec's official curve: ``steps`` thresholds ``arange(min, max,
    (max − min)/steps)`` over all scores; at each, a pixel is positive where its score is
    *above* it, PRO is the mean over every ground-truth component (8-connected) of its share of
    positive pixels, and FPR the share of positive normal pixels; the points with FPR <
    ``fpr_limit`` are kept, their FPRs min-max rescaled to [0, 1], and the area under PRO taken
    by the trapezoid rule. The curve is coarser than the official one and its FPR axis stretched,
    so the value differs from :func:`aupro`."""
    _check_fpr_limit(fpr_limit)
    if steps < 2:
        raise ValueError(f"steps must be at least 2; got {steps}")
    normal, defect, weights, n_components = _split_pixels(anomaly_maps, masks)
    weight_above = np.append(np.cumsum(weights[::-1])[::-1], 0.0)
    low, high = min(normal[0], defect[0]), max(normal[-1], defect[-1])
    if not high > low:
        raise ValueError("anomaly_maps are constant: a threshold sweep needs a range of scores")
    thresholds = np.arange(low, high, (high - low) / steps)
    fpr = (normal.size - np.searchsorted(normal, thresholds, side="right")) / normal.size
    pro = weight_above[np.searchsorted(defect, thresholds, side="right")] / n_components
    kept = fpr < fpr_limit
    fpr, pro = fpr[kept], pro[kept]
    if fpr.size < 2 or fpr.max() == fpr.min():
        raise ValueError(f"fewer than two distinct FPRs below {fpr_limit} in the sweep: the area is undefined")
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return float(abs(np.trapezoid(pro, fpr)))  # fpr falls as the thresholds rise


def trapezoid(x: ArrayLike, y: ArrayLike, x_max: float | None = None) -> float:
    """Area under ``y(x)`` (``x`` ascending) by the trapezoid rule, as MVTec's ``generic_util.trapezoid``.

    Non-finite points are dropped. With ``x_max``, integrates up to exactly ``x_max``: when it is
    not a sample point, the last segment ends at ``x_max`` with ``y`` linearly interpolated.
    """
    x = np.asarray(_to_numpy(x), dtype=np.float64)
    y = np.asarray(_to_numpy(y), dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        x, y = x[finite], y[finite]
    if x_max is None:
        return float(np.trapezoid(y, x))

    end = int(np.searchsorted(x, x_max, side="right"))  # x[:end] <= x_max
    if end == 0 or (end == x.size and x[-1] != x_max):
        raise ValueError(f"x_max={x_max} lies outside the range of the finite x values")
    area = float(np.trapezoid(y[:end], x[:end]))
    if x[end - 1] == x_max:
        return area
    x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
    y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    return area + float(0.5 * (y0 + y_at_max) * (x_max - x0))


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to FPR = ``fpr_limit``, divided by ``fpr_limit`` (MVTec AD official)."""
    _check_fpr_limit(fpr_limit)
    fpr, pro = pro_curve(anomaly_maps, masks)
    return trapezoid(fpr, pro, x_max=fpr_limit) / fpr_limit


def pooled_auroc(scores: ArrayLike, targets: ArrayLike) -> float:
    """Exact ROC AUC of all values of ``scores`` against ``targets`` > 0, pooled (sklearn)."""
    scores, targets = _to_numpy(scores), _to_numpy(targets)
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets must have one shape; got {scores.shape} and {targets.shape}")
    return float(roc_auc_score(targets.ravel() > 0, scores.ravel()))


class ImageAUROC(EvalSetMetric):
    """Exact ROC AUC of one score per image (field ``score_field``, [B]) against ``label`` [B]
    (1 = defective), reported as ``name``."""

    def __init__(self, score_field: str = "image_score", name: str = "image_auroc") -> None:
        self.fields = (score_field, "label")
        self.name = name

    def combine_set(self, rows: Rows) -> dict[str, float]:
        return {self.name: pooled_auroc(rows[self.fields[0]], rows["label"])}


class PixelAUROC(EvalSetMetric):
    """Exact ROC AUC over all pixels of all images, pooled: anomaly maps (field ``map_field``,
    [B, H, W]) against the ground-truth ``mask`` [B, H, W]."""

    name = "pixel_auroc"

    def __init__(self, map_field: str = "anomaly_map") -> None:
        self.fields = (map_field, "mask")

    def combine_set(self, rows: Rows) -> dict[str, float]:
        return {self.name: pooled_auroc(rows[self.fields[0]], rows["mask"])}


class AUPRO(EvalSetMetric):
    """MVTec AD AU-PRO up to ``fpr_limit`` (official: 0.3) of anomaly maps (field ``map_field``,
    [B, H, W]) against ``mask`` [B, H, W], over all images: the official curve (:func:`aupro`),
    or with ``sweep_steps`` the threshold sweep of :func:`aupro_threshold_sweep` (MSFlow's 800),
    reported as ``aupro_sweep<steps>`` so that the two are never mixed."""

    def __init__(self, map_field: str = "anomaly_map", fpr_limit: float = 0.3, sweep_steps: int | None = None) -> None:
        _check_fpr_limit(fpr_limit)
        self.fields = (map_field, "mask")
        self.fpr_limit = fpr_limit
        self.sweep_steps = sweep_steps
        self.name = "aupro" if sweep_steps is None else f"aupro_sweep{sweep_steps}"

    def combine_set(self, rows: Rows) -> dict[str, float]:
        maps, masks = rows[self.fields[0]], rows["mask"]
        if self.sweep_steps is None:
            return {self.name: aupro(maps, masks, fpr_limit=self.fpr_limit)}
        return {self.name: aupro_threshold_sweep(maps, masks, self.sweep_steps, self.fpr_limit)}


# --------------------------------------------------------------------------- scoring a submission


def read_submission(root: str | Path, maps: str | Path, category: str) -> dict[str, np.ndarray]:
    """The anomaly maps of ``<maps>/<category>/test/<defect>/<image>.tiff`` (the layout of MVTec's
    official evaluation and of ``callbacks.submission.MVTecTIFFMaps``) with their ground truth from
    the dataset ``<root>``: ``anomaly_map`` [N, H, W], ``mask`` [N, H, W], ``label`` [N], in the order
    of (defect, image). A missing map or one of another size than its ground truth is an error
    naming both files."""
    root, maps = Path(root), Path(maps)
    test = root / category / "test"
    images = sorted(p for p in test.glob("*/*.png"))
    if not images:
        raise FileNotFoundError(f"no test images {test}/<defect>/*.png: is {root} an MVTec AD root with {category!r}?")
    anomaly_maps, masks = [], []
    for image in images:
        defect = image.parent.name
        map_path = maps / category / "test" / defect / f"{image.stem}.tiff"
        if not map_path.is_file():
            raise FileNotFoundError(f"no anomaly map {map_path} for the test image {image}")
        anomaly_map = tifffile.imread(map_path).astype(np.float32)
        mask_path = root / category / "ground_truth" / defect / f"{image.stem}_mask.png"
        with Image.open(image) as opened:
            size = opened.size[::-1]
        mask = np.zeros(size, bool) if defect == "good" else np.asarray(Image.open(mask_path)) > 0
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"{map_path} is {anomaly_map.shape[1]}x{anomaly_map.shape[0]} px but the ground truth of "
                             f"{image} is {mask.shape[1]}x{mask.shape[0]}: maps must have the ground truth's size")
        anomaly_maps.append(anomaly_map)
        masks.append(mask)
    return {"anomaly_map": np.stack(anomaly_maps), "mask": np.stack(masks),
            "label": np.array([int(p.parent.name != "good") for p in images])}


def score_submission(root: str | Path, maps: str | Path, category: str, fpr_limit: float = 0.3) -> dict[str, float]:
    """What MVTec's official evaluation measures of one category's maps: AU-PRO up to ``fpr_limit``
    and image AUROC of each map's maximum, plus the pooled pixel AUROC."""
    items = read_submission(root, maps, category)
    items["image_score"] = items["anomaly_map"].reshape(len(items["label"]), -1).max(axis=1)
    metrics = [AUPRO(fpr_limit=fpr_limit), PixelAUROC(), ImageAUROC()]
    return {key: value for metric in metrics for key, value in metric.score(**items).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.metrics.mvtec",
        description="Score MVTec AD anomaly maps (<maps>/<category>/test/<defect>/<image>.tiff) against the dataset's "
                    "ground truth with visionzoo's official-metric code.")
    parser.add_argument("root", help="the MVTec AD root (<root>/<category>/test, ground_truth)")
    parser.add_argument("maps", help="the folder of maps, e.g. runs/mvtec/msflow/bottle/mvtec_anomaly_maps")
    parser.add_argument("--categories", nargs="+", help="default: every category folder under MAPS")
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    parser.add_argument("--out", help="write the scores as JSON {category: {metric: value}} to this file")
    args = parser.parse_args(argv)
    categories = args.categories or sorted(p.name for p in Path(args.maps).iterdir() if p.is_dir())
    scores = {category: score_submission(args.root, args.maps, category, args.fpr_limit) for category in categories}
    names = list(next(iter(scores.values()))) if scores else []
    print("| category | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for category, values in scores.items():
        print(f"| {category} | " + " | ".join(f"{100 * values[name]:.2f}" for name in names) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main()
