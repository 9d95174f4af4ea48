"""Official face recognition metrics: 10-fold verification accuracy and IJB-C TAR@FAR.

Definitions (benchmarks.md §3.3, §3.4):

- **Verification accuracy** (insightface ``arcface_torch/eval/verification.py``, ``evaluate`` and
  ``calculate_roc``): the embeddings, each already the sum of the unnormalised outputs for the image
  and its horizontal flip, are L2-normalised; ``dist = ||e1 - e2||^2``; a pair is predicted "same"
  iff ``dist < threshold``. The pairs are split into ``nfolds`` contiguous folds as sklearn's
  ``KFold(shuffle=False)`` does (the first ``P % nfolds`` folds one pair longer). For each fold the
  threshold of ``np.arange(0, 4, 0.01)`` with the highest accuracy on the other folds (the first
  one on ties) is applied to the fold. Reported: mean and (population) std of the fold accuracies.
- **TAR@FAR** (insightface ``arcface_torch/eval_ijbc.py``): ``sklearn.metrics.roc_curve(labels,
  scores)`` with its default ``drop_intermediate=True``, both arrays reversed; for each target FAR
  the TPR of the ROC point whose FPR is nearest (``argmin |fpr - far|``, so ties go to the larger
  TPR). No interpolation.

Pitfalls guarded against: shuffled folds; a threshold chosen on all pairs or on the test fold;
``<=`` instead of ``<``; thresholds on cosine similarity (another grid); normalising each view
before summing (the caller sums, this normalises); interpolated or "max TPR with FPR <= far"
operating points; ``drop_intermediate=False``. Distances are computed in float64; the official
float32 run can differ only for a distance within float32 rounding of a grid threshold.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_curve
from torch import Tensor

from benchmarks.metrics.base import BenchmarkMetric, Rows

ArrayLike = np.ndarray | Tensor | Sequence[float]

THRESHOLDS = np.arange(0, 4, 0.01)
IJBC_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _to_float64(array: ArrayLike) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().cpu().to(torch.float64).numpy()
    return np.asarray(array, dtype=np.float64)


def _to_bool(array: ArrayLike) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array).astype(bool)


def _l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; zero rows stay zero (``sklearn.preprocessing.normalize``)."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms == 0, 1.0, norms)


def kfold_slices(n: int, nfolds: int) -> list[slice]:
    """Contiguous folds of ``range(n)`` as sklearn ``KFold(nfolds, shuffle=False)``."""
    if not 2 <= nfolds <= n:
        raise ValueError(f"need 2 <= nfolds <= number of pairs; got nfolds={nfolds} for {n} pairs")
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for size, end in zip(sizes, ends)]


def verification_accuracy(
    embeddings1: ArrayLike, embeddings2: ArrayLike, issame: ArrayLike, nfolds: int = 10
) -> tuple[float, float]:
    """``(mean, std)`` of the held-out fold accuracies of insightface's ``calculate_roc``.

    ``embeddings1[i]`` and ``embeddings2[i]`` ([P, D]) are pair i, each the flip-summed embedding;
    ``issame`` [P] is true for pairs of one identity.
    """
    e1, e2, same = _to_float64(embeddings1), _to_float64(embeddings2), _to_bool(issame)
    if e1.ndim != 2 or e1.shape != e2.shape or same.shape != e1.shape[:1]:
        raise ValueError(
            "expected embeddings1 and embeddings2 of shape [P, D] and issame of shape [P]; got "
            f"{e1.shape}, {e2.shape} and {same.shape}"
        )
    dist = np.sum(np.square(_l2_normalise(e1) - _l2_normalise(e2)), axis=1)
    # correct[k, t]: pairs of fold k classified correctly at threshold t.
    folds = kfold_slices(len(dist), nfolds)
    is_correct = (dist[:, None] < THRESHOLDS[None, :]) == same[:, None]
    correct = np.stack([is_correct[fold].sum(axis=0) for fold in folds])
    accuracies = []
    for k, fold in enumerate(folds):
        best = int(np.argmax(correct.sum(axis=0) - correct[k]))  # same denominator for every t
        accuracies.append(correct[k, best] / (fold.stop - fold.start))
    return float(np.mean(accuracies)), float(np.std(accuracies))


class VerificationAccuracy(BenchmarkMetric):
    """:func:`verification_accuracy` of every verification set (``.bin``) evaluated.

    Items are the images of a set in ``.bin`` order; images ``2i`` and ``2i + 1`` form pair i.
    Fields: ``embedding`` [B, D] (the flip-summed embedding) and ``issame`` [B] (the label of the
    image's pair). Reports ``<set>_acc`` and ``<set>_std`` per set and ``acc``, their mean over
    the sets (insightface's table). A pair with an image missing (``limit_*_batches``) is left
    out, with a warning.
    """

    fields = ("embedding", "issame")

    def __init__(self, nfolds: int = 10) -> None:
        self.nfolds = nfolds

    def combine(self, sets: Mapping[str, Rows]) -> dict[str, float]:
        results = {}
        for name, rows in sets.items():
            index = rows["index"]
            position = torch.full((int(index.max()) // 2 * 2 + 2,), -1, dtype=torch.long)
            position[index] = torch.arange(len(index))
            first, second = position[0::2], position[1::2]
            complete = (first >= 0) & (second >= 0)
            if not complete.all():
                warnings.warn(f"{name}: {int(complete.sum())} complete pairs evaluated; "
                              f"{int((~complete & ((first >= 0) | (second >= 0))).sum())} pairs lack an image")
            first, second = first[complete], second[complete]
            accuracy, std = verification_accuracy(rows["embedding"][first], rows["embedding"][second],
                                                  rows["issame"][first], self.nfolds)
            results[f"{name}_acc"], results[f"{name}_std"] = accuracy, std
        accuracies = [value for key, value in results.items() if key.endswith("_acc")]
        return {**results, "acc": float(np.mean(accuracies))} if accuracies else results


def tar_at_far(
    scores: ArrayLike, labels: ArrayLike, fars: Sequence[float] = IJBC_FARS
) -> dict[float, float]:
    """TPR (TAR) at the ROC point nearest each FAR in ``fars``, as insightface's ``eval_ijbc.py``.

    ``scores`` [N] are similarities (higher = more likely the same identity), ``labels`` [N] are 1
    for genuine pairs and 0 for impostor pairs.
    """
    scores, labels = _to_float64(scores), _to_bool(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"expected scores and labels of one shape [N]; got {scores.shape}, {labels.shape}")
    if labels.all() or not labels.any():
        raise ValueError("TAR@FAR needs both genuine (label 1) and impostor (label 0) pairs")
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {far: float(tpr[np.argmin(np.abs(fpr - far))]) for far in fars}
