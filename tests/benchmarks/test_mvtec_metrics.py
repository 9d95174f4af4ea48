"""MVTec AD metrics: hand-worked cases and a brute-force check against the official definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from lightning_modules.base import Evaluation
from benchmarks.metrics.mvtec import AUPRO, ImageAUROC, PixelAUROC, aupro, aupro_threshold_sweep, pro_curve, trapezoid

# One 2x3 image, one defect component of 2 pixels (x), 4 normal pixels.
#   mask   [[0, x,  x ],     scores [[0.2, 0.9, 0.5],
#           [0, 0,  0 ]]             [0.6, 0.1, 0.3]]
# Descending: 0.9 D -> (0, 1/2); 0.6 N -> (1/4, 1/2); 0.5 D -> (1/4, 1); 0.3, 0.2, 0.1 N -> (3/4|1|1, 1).
# Area up to 0.3: 0.25 * 0.5 + 0.05 * 1 = 0.175; AU-PRO = 0.175 / 0.3 = 7/12.
MASK_2X3 = np.array([[[0, 255, 255], [0, 0, 0]]], dtype=np.uint8)
SCORES_2X3 = np.array([[[0.2, 0.9, 0.5], [0.6, 0.1, 0.3]]])


def test_pro_curve_hand_worked() -> None:
    fpr, pro = pro_curve(SCORES_2X3, MASK_2X3)
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.25, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1, 1, 1, 1])
    assert aupro(SCORES_2X3, MASK_2X3) == pytest.approx(7 / 12, abs=1e-12)
    # Up to FPR 1: 0.25 * 0.5 + 0.75 * 1 = 0.875.
    assert aupro(SCORES_2X3, MASK_2X3, fpr_limit=1.0) == pytest.approx(0.875, abs=1e-12)


def test_trapezoid_with_and_without_interpolation() -> None:
    x, y = [0, 0.2, 0.5, 1], [0, 0.4, 0.7, 1]
    # Whole: 0.2 * 0.2 + 0.3 * 0.55 + 0.5 * 0.85 = 0.04 + 0.165 + 0.425 = 0.63.
    assert trapezoid(x, y) == pytest.approx(0.63, abs=1e-12)
    # To 0.5, a sample point: 0.04 + 0.165 = 0.205.
    assert trapezoid(x, y, x_max=0.5) == pytest.approx(0.205, abs=1e-12)
    # To 0.3: y(0.3) = 0.4 + 0.1 * (0.3 / 0.3) = 0.5; 0.04 + 0.1 * (0.4 + 0.5) / 2 = 0.085.
    assert trapezoid(x, y, x_max=0.3) == pytest.approx(0.085, abs=1e-12)
    # Non-finite points are dropped.
    assert trapezoid([0, np.nan, 0.2, 0.5, 1], [0, 0.3, 0.4, 0.7, np.inf], x_max=0.3) == pytest.approx(
        0.085, abs=1e-12
    )
    with pytest.raises(ValueError, match="outside"):
        trapezoid(x, y, x_max=1.5)


def _naive_aupro_without_tie_merging(scores: np.ndarray, masks: np.ndarray) -> float:
    """One curve point per pixel in a stable descending sort: wrong under ties (single component)."""
    order = np.argsort(-scores.ravel(), kind="stable")
    defect = masks.ravel()[order] > 0
    fpr = np.r_[0, np.cumsum(~defect) / np.count_nonzero(~defect), 1]
    pro = np.r_[0, np.cumsum(defect) / np.count_nonzero(defect), 1]
    return trapezoid(fpr, pro, x_max=0.3) / 0.3


def test_tied_scores_are_one_curve_point() -> None:
    # 1x4 image: defect pixel A = 0.5 ties with normal pixel B = 0.5; normals C = 0.2, D = 0.1.
    # Merged: t = 0.5 -> (1/3, 1); then (2/3, 1), (1, 1). Chord (0, 0)-(1/3, 1) gives y(0.3) = 0.9,
    # area 0.3 * 0.9 / 2 = 0.135, AU-PRO = 0.45.
    scores = np.array([[[0.5, 0.5, 0.2, 0.1]]])
    masks = np.array([[[1, 0, 0, 0]]])
    fpr, pro = pro_curve(scores, masks)
    np.testing.assert_allclose(fpr, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(pro, [0, 1, 1, 1, 1])
    assert aupro(scores, masks) == pytest.approx(0.45, abs=1e-12)
    # Per pixel, A before B: (0, 1) then (1/3, 1): AU-PRO 1.0, which is wrong.
    assert _naive_aupro_without_tie_merging(scores, masks) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("good_scores", "expected"),
    [
        # 10 normal pixels. Descending: 0.95 N (0.1, 0); 0.9 D (0.1, 1/2); 0.6 N (0.2, 1/2);
        # 0.5 D (0.2, 1); 0.3 N (0.3, 1) ... Area to 0.3: 0 + 0.1 * 0.5 + 0.1 * 1 = 0.15 -> 1/2.
        ([[0.95, 0, 0], [0, 0, 0]], 0.5),
        # All below every other score: 0.9 D (0, 1/2); 0.6 N (0.1, 1/2); 0.5 D (0.1, 1) ...
        # Area to 0.3: 0.1 * 0.5 + 0.2 * 1 = 0.25 -> 5/6.
        ([[0, 0, 0], [0, 0, 0]], 5 / 6),
    ],
)
def test_good_images_only_add_normal_pixels(good_scores: list, expected: float) -> None:
    scores = np.concatenate([SCORES_2X3, [good_scores]])
    masks = np.concatenate([MASK_2X3, np.zeros_like(MASK_2X3)])
    assert aupro(scores, masks) == pytest.approx(expected, abs=1e-12)


def test_pro_is_mean_over_components_not_pixels() -> None:
    # Components A (3 pixels, scored 0.1) and B (1 pixel, scored 0.9), 6 normal pixels at 0.5.
    # t = 0.9 -> (0, 1/2): B found, A not; mean over components 1/2 (pixel-weighted: 1/4).
    # t = 0.5 -> (1, 1/2); t = 0.1 -> (1, 1). AU-PRO = 0.5 (pixel-weighted would be 0.25).
    masks = np.array([[[1, 1, 1, 0, 1], [0, 0, 0, 0, 0]]])
    scores = np.array([[[0.1, 0.1, 0.1, 0.5, 0.9], [0.5, 0.5, 0.5, 0.5, 0.5]]])
    fpr, pro = pro_curve(scores, masks)
    np.testing.assert_allclose(fpr, [0, 0, 1, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert aupro(scores, masks) == pytest.approx(0.5, abs=1e-12)


def test_diagonal_pixels_are_one_component() -> None:
    # 8-connected: one component of 3 pixels, of which only the 0.9 one is found before all 5
    # normals (0.5): curve (0, 1/3), (1, 1/3), (1, 1): AU-PRO 1/3. With 4-connectivity it
    # would be two components, {2 pixels} and {1 pixel}, and AU-PRO 1/2.
    masks = np.array([[[1, 1, 0, 0], [0, 0, 1, 0]]])
    scores = np.array([[[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.5]]])
    assert aupro(scores, masks) == pytest.approx(1 / 3, abs=1e-12)


def _random_case(seed: int, quantised: bool) -> tuple[np.ndarray, np.ndarray]:
    """6 images of 16x16: 4 with random blob defects, 2 good; maps that are higher on defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 16, 16), dtype=np.uint8)
    for mask in masks[:4]:
        seeds = rng.random((16, 16)) < 0.02
        seeds[rng.integers(16), rng.integers(16)] = True
        mask[ndimage.binary_dilation(seeds, iterations=int(rng.integers(1, 3)))] = 255
    scores = rng.normal(size=masks.shape) + 1.5 * (masks > 0)
    if quantised:
        scores = np.round(scores * 2) / 2
    return scores.astype(np.float32), masks


def _brute_force_aupro(scores: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Straight from the definition: every unique threshold, FPR and mean per-component recall."""
    labels = [ndimage.label(m > 0, structure=np.ones((3, 3)))[0] for m in masks]
    components = [(i, k) for i, lab in enumerate(labels) for k in range(1, lab.max() + 1)]
    normal_scores = scores[masks == 0]
    points = []
    for t in np.unique(scores)[::-1]:
        fpr = np.mean(normal_scores >= t)
        pro = np.mean([np.mean(scores[i][labels[i] == k] >= t) for i, k in components])
        points.append((fpr, pro))
    xs, ys = np.array([(0.0, 0.0), *points, (1.0, 1.0)]).T
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            area += (limit - x0) * (y0 + np.interp(limit, [x0, x1], [y0, y1])) / 2
    return area / limit


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force_definition(seed: int, quantised: bool) -> None:
    scores, masks = _random_case(seed, quantised)
    if quantised:
        assert np.unique(scores).size < scores.size / 10  # many ties
    assert aupro(scores, masks) == pytest.approx(_brute_force_aupro(scores, masks), abs=1e-9)


def _msflow_sweep_by_the_definition(scores: np.ndarray, masks: np.ndarray, steps: int = 800) -> float:
    """MSFlow's ``eval_seg_pro`` loop as its definition reads: each threshold of ``arange(min,
    max, (max − min)/steps)``, the mean over components of the share of their pixels above it, the
    share of normal pixels above it; FPR < 0.3 kept, min-max rescaled, trapezoid area."""
    labels = [ndimage.label(m > 0, structure=np.ones((3, 3)))[0] for m in masks]
    low, high = scores.min(), scores.max()
    fprs, pros = [], []
    for t in np.arange(low, high, (high - low) / steps):
        positive = scores > t
        pros.append(np.mean([positive[i][lab == k].sum() / (lab == k).sum()
                             for i, lab in enumerate(labels) for k in range(1, lab.max() + 1)]))
        fprs.append(np.logical_and(masks == 0, positive).sum() / (masks == 0).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    kept = fprs < 0.3
    x = (fprs[kept] - fprs[kept].min()) / (fprs[kept].max() - fprs[kept].min())
    y = pros[kept]
    return float(abs(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]))))


@pytest.mark.parametrize("seed", [0, 1])
def test_msflow_threshold_sweep_follows_its_definition_and_differs_from_the_official_curve(seed: int) -> None:
    scores, masks = _random_case(seed, quantised=False)
    swept = aupro_threshold_sweep(scores, masks, steps=200)
    assert swept == pytest.approx(_msflow_sweep_by_the_definition(scores, masks, steps=200), abs=1e-9)
    assert abs(swept - aupro(scores, masks)) > 1e-3  # a rescaled FPR axis: not the official number
    metric = AUPRO(sweep_steps=200)
    assert metric.name == "aupro_sweep200"
    rows = {"anomaly_map": torch.from_numpy(scores), "mask": torch.from_numpy(masks)}
    assert metric.combine_set(rows) == {"aupro_sweep200": pytest.approx(swept, abs=1e-12)}


def test_perfect_and_constant_maps() -> None:
    _, masks = _random_case(0, quantised=False)
    perfect = (masks > 0) + np.random.default_rng(0).random(masks.shape) * 0.5
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    # One score everywhere: curve (0, 0) -> (1, 1); area to 0.3 is 0.3 * 0.3 / 2 = 0.045 -> 0.15.
    assert aupro(np.ones(masks.shape), masks) == pytest.approx(0.15, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_torch_inputs(dtype: torch.dtype) -> None:
    scores, masks = _random_case(3, quantised=False)
    maps = torch.from_numpy(scores).to(dtype)
    expected = aupro(maps.float().numpy(), masks)  # every such dtype is exact in float32
    assert aupro(maps, torch.from_numpy(masks > 0)) == pytest.approx(expected, abs=1e-12)


def test_invalid_inputs_raise() -> None:
    scores, masks = _random_case(0, quantised=False)
    with pytest.raises(ValueError, match="no defect pixels"):
        aupro(scores, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no normal pixels"):
        aupro(scores, np.ones_like(masks))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        aupro(scores[:, :8], masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(scores, masks, fpr_limit=0.0)


def test_metrics_in_batches_equal_the_whole() -> None:
    """Batches accumulated by the evaluation layer, in a shuffled order: the metrics of the whole."""
    scores, masks = _random_case(4, quantised=True)
    evaluation = Evaluation([AUPRO(), PixelAUROC()])
    for batch in np.array_split(np.random.default_rng(0).permutation(6), 3):
        evaluation.update({"anomaly_map": torch.from_numpy(scores[batch]), "mask": torch.from_numpy(masks[batch]),
                           "eval_set": ["test"] * len(batch), "index": torch.from_numpy(batch)})
    results = evaluation.compute()
    assert results["aupro"] == pytest.approx(aupro(scores, masks), abs=1e-12)
    expected_auroc = roc_auc_score(masks.ravel() > 0, scores.ravel())
    assert results["pixel_auroc"] == pytest.approx(expected_auroc, abs=1e-12)


def test_pixel_auroc_is_exact_for_any_score_range() -> None:
    scores, masks = _random_case(5, quantised=True)
    scores01 = (scores - scores.min()) / (scores.max() - scores.min())
    exact = binary_auroc(torch.from_numpy(scores01).ravel(), torch.from_numpy(masks > 0).ravel().long())
    metric = PixelAUROC()
    result = metric.score(anomaly_map=torch.from_numpy(scores01), mask=torch.from_numpy(masks))
    assert result["pixel_auroc"] == pytest.approx(exact.item(), abs=1e-6)
    # Large scores: torchmetrics would apply a sigmoid, saturating them all to 1.0 in float32.
    result = metric.score(anomaly_map=torch.from_numpy(scores01 * 100 + 50), mask=torch.from_numpy(masks))
    assert result["pixel_auroc"] == pytest.approx(exact.item(), abs=1e-6)


def test_metric_without_defects_raises() -> None:
    scores, masks = _random_case(0, quantised=False)
    with pytest.raises(ValueError, match="no defect pixels"):
        AUPRO().score(anomaly_map=torch.from_numpy(scores), mask=torch.zeros(masks.shape, dtype=torch.uint8))


def test_image_auroc_hand_worked_with_a_tie():
    """Scores of 2 good (0.1, 0.5) and 2 defective (0.5, 0.9) images: of the 4 (defective, good)
    pairs, 3 are ranked right and 1 is tied (counts 1/2), so AUROC = 3.5 / 4."""
    result = ImageAUROC().score(image_score=torch.tensor([0.1, 0.5, 0.5, 0.9]), label=torch.tensor([0, 1, 0, 1]))
    assert result == {"image_auroc": pytest.approx(3.5 / 4)}


def test_image_auroc_is_exact_for_scores_outside_the_unit_interval():
    metric = ImageAUROC("image_score_max", "image_auroc_max")
    assert metric.fields == ("image_score_max", "label")
    result = metric.score(image_score_max=torch.tensor([120.0, 121.0, 119.0]), label=torch.tensor([0, 1, 0]))
    assert result == {"image_auroc_max": 1.0}
