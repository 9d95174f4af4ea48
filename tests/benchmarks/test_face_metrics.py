"""Face metrics: 10-fold verification accuracy and IJB-C TAR@FAR on hand-worked cases, and the
verification accuracy against a direct loop over sklearn's KFold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from benchmarks.metrics.face import THRESHOLDS, kfold_slices, tar_at_far, verification_accuracy

SAME, DIFF = 0.305, 1.705  # squared distances off the 0.01 grid: thresholds 0.31 .. 1.70 separate them


def pairs_at(distances: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (1, 0) and (c, s) with squared distance 2 - 2c = d."""
    c = 1 - np.asarray(distances) / 2
    e1 = np.stack([np.ones_like(c), np.zeros_like(c)], axis=1)
    return e1, np.stack([c, np.sqrt(1 - c**2)], axis=1)


def alternating(n: int) -> tuple[list[float], list[bool]]:
    """n pairs alternating same (at SAME) and different (at DIFF)."""
    return [SAME if i % 2 == 0 else DIFF for i in range(n)], [i % 2 == 0 for i in range(n)]


def test_separable() -> None:
    distances, issame = alternating(20)
    e1, e2 = pairs_at(distances)
    assert verification_accuracy(5 * e1, 0.1 * e2, issame) == (1.0, 0.0)  # scale-free: normalised


def test_held_out_pair_misclassified() -> None:
    # Pair 0 is a "same" pair at 1.205. Held out (fold 0 = pairs 0, 1), the other 9 folds choose
    # 0.31 and pair 0 is called different: fold accuracy 1/2. The other folds train with pair 0
    # and choose 1.21, which still separates their held-out pairs: 1.0.
    # Mean (0.5 + 9) / 10 = 0.95; std sqrt((0.45^2 + 9 * 0.05^2) / 10) = 0.15.
    distances, issame = alternating(20)
    distances[0] = 1.205
    mean, std = verification_accuracy(*pairs_at(distances), issame)
    assert mean == pytest.approx(0.95, abs=1e-12) and std == pytest.approx(0.15, abs=1e-12)


def test_ties_first_threshold_and_contiguous_folds() -> None:
    # Pairs 0-2 are "same" at A = 1.505 and pair 3 "different" at D = 1.405; the others alternate
    # same at 0.505 and different at 2.505. On a training set with a A-pairs and d D-pairs a low
    # threshold (0.51 .. 1.40) makes a errors, a high one (1.51 .. 2.50) d errors.
    # Contiguous folds {0, 1}, {2, 3}, {4, 5}, ...:
    #   fold 0 trains on A, D: a tie, 1 error each; the first maximum is 0.51: pairs 0 and 1 wrong -> 0
    #   fold 1 trains on A, A: 1.51 wins; pair 2 right, pair 3 (1.405 < 1.51) wrong -> 0.5
    #   folds 2-9 train on 3 A and 1 D: 1.51; their pairs right -> 1
    # mean 0.85, std sqrt((0.85^2 + 0.35^2 + 8 * 0.15^2) / 10) = sqrt(0.1025).
    # Taking the last maximum on ties gives fold 0 accuracy 1 (mean 0.95); folds i % 10 (pairs i and
    # i + 10) give 1, 1, 1, 0.5, 1, ... (mean 0.95, std 0.15).
    distances = [1.505, 1.505, 1.505, 1.405] + [0.505 if i % 2 == 0 else 2.505 for i in range(16)]
    issame = [True, True, True, False] + [i % 2 == 0 for i in range(16)]
    mean, std = verification_accuracy(*pairs_at(distances), issame)
    assert mean == pytest.approx(0.85, abs=1e-12) and std == pytest.approx(np.sqrt(0.1025), abs=1e-12)


def test_same_iff_distance_strictly_below_threshold() -> None:
    # Pair 0 is "same" at exactly 1.0 = THRESHOLDS[100]; the other same pairs lie at 0.995 and the
    # different pairs at exactly 2.0. Without pair 0 the first best threshold is 1.0, and 1.0 < 1.0
    # is false: pair 0 is wrong (fold 0: 0.5). With it, 1.01 is chosen: the other folds score 1.
    # Mean 0.95, std 0.15; "<=" would give 1.0 and 0.
    assert THRESHOLDS[100] == 1.0 and THRESHOLDS[101] > 1.0
    e1 = np.tile([1.0, 0.0, 0.0, 0.0], (20, 1))
    e2 = np.tile([0.0, 1.0, 0.0, 0.0], (20, 1))  # squared distance 2
    e2[0] = [0.5, 0.5, 0.5, 0.5]  # unit norm, squared distance exactly 1
    c = 1 - 0.995 / 2
    e2[2::2] = [c, np.sqrt(1 - c**2), 0.0, 0.0]
    issame = [i % 2 == 0 for i in range(20)]
    mean, std = verification_accuracy(e1, e2, issame)
    assert mean == pytest.approx(0.95, abs=1e-12) and std == pytest.approx(0.15, abs=1e-12)


def reference_accuracy(
    e1: np.ndarray, e2: np.ndarray, issame: np.ndarray, nfolds: int
) -> tuple[float, float]:
    """The definition written as a direct loop over sklearn's KFold and the thresholds."""
    dist = np.sum(np.square(normalize(e1) - normalize(e2)), axis=1)
    accuracies = []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(dist):
        train_accuracy = [np.mean((dist[train] < t) == issame[train]) for t in THRESHOLDS]
        best = THRESHOLDS[np.argmax(train_accuracy)]
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
    return float(np.mean(accuracies)), float(np.std(accuracies))


@pytest.mark.parametrize(("pairs", "nfolds"), [(53, 10), (40, 10), (17, 3)])
def test_matches_direct_loop(pairs: int, nfolds: int) -> None:
    rng = np.random.default_rng(pairs)
    issame = rng.random(pairs) < 0.5
    e1 = rng.normal(size=(pairs, 8))
    e2 = np.where(issame[:, None], e1, 0) + rng.normal(scale=1.2, size=(pairs, 8))
    expected = reference_accuracy(e1, e2, issame, nfolds)
    assert verification_accuracy(e1, e2, issame, nfolds) == pytest.approx(expected, abs=1e-12)
    tensors = torch.from_numpy(e1), torch.from_numpy(e2), torch.from_numpy(issame)
    assert verification_accuracy(*tensors, nfolds=nfolds) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "nfolds"), [(20, 10), (53, 10), (6000, 10), (7, 3), (5, 5)])
def test_kfold_slices_match_sklearn(n: int, nfolds: int) -> None:
    ours = [np.arange(n)[fold] for fold in kfold_slices(n, nfolds)]
    theirs = [test for _, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(n))]
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_verification_input_errors() -> None:
    e1, e2 = pairs_at([SAME] * 5)
    with pytest.raises(ValueError, match="nfolds"):
        verification_accuracy(e1, e2, [True] * 5, nfolds=10)
    with pytest.raises(ValueError, match="shape"):
        verification_accuracy(e1, e2, [True] * 4, nfolds=2)


# 4 genuine (G) and 8 impostor (I) scores, descending:
#   0.9 G, 0.85 I, 0.8 G, 0.7 I, 0.6 G, 0.5 I, 0.45 I, 0.4 I, 0.3 G, 0.2 I, 0.1 I, 0.05 I
# Cumulative (impostors, genuines) above each threshold: (0,1) (1,1) (1,2) (2,2) (2,3) (3,3) (4,3)
# (5,3) (5,4) (6,4) (7,4) (8,4). drop_intermediate removes the collinear (3,3), (4,3), (6,4), (7,4)
# and roc_curve prepends (0,0), so the points (FPR = I/8, TPR = G/4) are
#   (0, 0) (0, .25) (.125, .25) (.125, .5) (.25, .5) (.25, .75) (.625, .75) (.625, 1) (1, 1).
GENUINE = [0.9, 0.8, 0.6, 0.3]
IMPOSTOR = [0.85, 0.7, 0.5, 0.45, 0.4, 0.2, 0.1, 0.05]
SCORES = np.array(GENUINE + IMPOSTOR)
LABELS = np.array([1] * 4 + [0] * 8)


def test_tar_at_far_hand_worked() -> None:
    # 1e-6 -> FPR 0, points (0, 0) and (0, .25): the larger TPR.  0.1 -> FPR .125: TPR .5.
    # 0.1875 lies exactly between .125 and .25: the tie goes to the later ROC point, (.25, .75).
    # 0.3 -> .25: .75.  0.5 -> .625 (the dropped point (.5, .75) would have been exact): 1.0.
    assert tar_at_far(SCORES, LABELS, fars=(1e-6, 0.1, 0.1875, 0.3, 0.5)) == {
        1e-6: 0.25,
        0.1: 0.5,
        0.1875: 0.75,
        0.3: 0.75,
        0.5: 1.0,
    }
    assert tar_at_far(torch.tensor(SCORES), torch.tensor(LABELS)) == {
        1e-6: 0.25, 1e-5: 0.25, 1e-4: 0.25, 1e-3: 0.25, 1e-2: 0.25, 1e-1: 0.5
    }


def test_tar_at_far_nearest_point_not_interpolation() -> None:
    fpr, tpr, _ = roc_curve(LABELS, SCORES)
    # At FAR 0.1 the curve interpolates to .25 (between (0, .25) and (.125, .25)), and the best
    # TPR with FPR <= 0.1 is .25; the nearest ROC point gives .5.
    assert np.interp(0.1, fpr, tpr) == 0.25 and tpr[fpr <= 0.1].max() == 0.25
    assert tar_at_far(SCORES, LABELS, fars=(0.1,)) == {0.1: 0.5}
    # Without drop_intermediate, (.5, .75) is a point and FAR 0.5 would give .75, not 1.0.
    fpr_all, tpr_all, _ = roc_curve(LABELS, SCORES, drop_intermediate=False)
    fpr_all, tpr_all = fpr_all[::-1], tpr_all[::-1]
    assert tpr_all[np.argmin(np.abs(fpr_all - 0.5))] == 0.75
    assert tar_at_far(SCORES, LABELS, fars=(0.5,)) == {0.5: 1.0}


def test_tar_at_far_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both genuine"):
        tar_at_far([0.5, 0.6], [1, 1])
