"""UCF101 video metrics: clip- and video-level top-1 accuracy, and video retrieval R@k.

Definitions:

- **Clip top-1**: each clip scored on its own, ``argmax(logits) == label``.
- **Video top-1** (VCOP, CoCLR): the softmax averaged over all clips of a video, then argmax per
  video; the fraction of videos classified correctly. Clips are grouped by ``video_ids``, in any
  order and any number per video.
- **Retrieval R@k** (VCOP ``retrieve_clips.py``, as adopted by CoCLR): split-1 test videos query
  split-1 train videos, each one video-level feature (VCOP: the mean of 10 uniformly sampled clip
  features, :func:`video_features`). With ``center=True`` (CoCLR) the mean feature is subtracted
  from the queries and from the gallery, each set its own mean; both are then L2-normalised and
  ranked by dot product (cosine similarity; ``center=False`` is VCOP's sklearn
  ``cosine_distances``). R@k is the fraction of queries with at least one item of their class
  among the top k (hit@k, not precision@k); k is clamped to the gallery size.

Pitfalls guarded against: averaging logits instead of softmax over clips; reporting the clip-level
number as the video-level one; precision@k instead of hit@k; centring queries and gallery with
one shared mean; forgetting to normalise after centring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from benchmarks.metrics.base import BenchmarkMetric, EvalSetMetric, Rows
from benchmarks.metrics.retrieval import search

ArrayLike = np.ndarray | Tensor

RETRIEVAL_KS = (1, 5, 10, 20, 50)


def _group_mean(values: Tensor, video_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(unique_ids, means)``: the mean of the rows of ``values`` [N, D] of each id, ids sorted."""
    if values.ndim != 2 or video_ids.shape != values.shape[:1]:
        raise ValueError(
            f"expected values [N, D] and video_ids [N]; got {tuple(values.shape)}, {tuple(video_ids.shape)}"
        )
    unique_ids, inverse, counts = torch.unique(video_ids, return_inverse=True, return_counts=True)
    sums = values.new_zeros(len(unique_ids), values.shape[1]).index_add_(0, inverse, values)
    return unique_ids, sums / counts[:, None].to(values.dtype)


def video_scores(logits: Tensor, video_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(unique_ids, mean_softmax)``: the softmax of the clip ``logits`` [N, C] averaged per video."""
    return _group_mean(logits.double().softmax(dim=1), video_ids)


def video_features(clip_features: Tensor, video_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(unique_ids, mean_features)``: the clip features [N, D] averaged per video (VCOP)."""
    return _group_mean(clip_features, video_ids)


def _check_logits(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or len(labels) == 0:
        raise ValueError(
            f"expected logits [N, C] and labels [N], N > 0; got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )


def clip_top1(logits: Tensor, labels: Tensor) -> float:
    """Fraction of clips whose argmax over ``logits`` [N, C] is their label [N]."""
    _check_logits(logits, labels)
    return (logits.argmax(dim=1) == labels).double().mean().item()


def per_video_labels(labels: Tensor, video_ids: Tensor, unique_ids: Tensor) -> Tensor:
    """The label of each video of ``unique_ids`` (sorted) from its clips' ``labels`` and ``video_ids``."""
    return labels.new_zeros(len(unique_ids)).index_put_((torch.searchsorted(unique_ids, video_ids),), labels)


def video_top1(logits: Tensor, labels: Tensor, video_ids: Tensor) -> float:
    """Fraction of videos whose argmax of the clip-averaged softmax is their label.

    ``logits`` [N, C], ``labels`` [N] and ``video_ids`` [N] are per clip; the clips of a video must
    share one label.
    """
    _check_logits(logits, labels)
    unique_ids, scores = video_scores(logits, video_ids)
    video_labels = per_video_labels(labels, video_ids, unique_ids)
    if (video_labels[torch.searchsorted(unique_ids, video_ids)] != labels).any():
        raise ValueError("the clips of a video carry different labels")
    return (scores.argmax(dim=1) == video_labels).double().mean().item()


def _to_numpy(array: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=dtype)


def retrieval_recall_at_k(
    query_features: ArrayLike,
    query_labels: ArrayLike,
    gallery_features: ArrayLike,
    gallery_labels: ArrayLike,
    ks: Sequence[int] = RETRIEVAL_KS,
    center: bool = True,
) -> dict[int, float]:
    """R@k (hit@k) of each k in ``ks`` for video features [Q, D] querying a gallery [G, D].

    A query counts as a hit at k if any of its k most cosine-similar gallery items has its label;
    with ``center`` each set first has its own mean feature subtracted (CoCLR).
    """
    queries = _to_numpy(query_features, np.float64)
    gallery = _to_numpy(gallery_features, np.float64)
    q_labels, g_labels = _to_numpy(query_labels, np.int64), _to_numpy(gallery_labels, np.int64)
    for name, features in (("query_features", queries), ("gallery_features", gallery)):
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"{name} must be a non-empty [N, D] array; got shape {features.shape}")
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(
            f"gallery_features has dimension {gallery.shape[1]}, query_features {queries.shape[1]}"
        )
    for name, labels, features in (
        ("query_labels", q_labels, queries),
        ("gallery_labels", g_labels, gallery),
    ):
        if labels.shape != features.shape[:1]:
            raise ValueError(f"{name} must have shape ({len(features)},); got {labels.shape}")
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive; got {tuple(ks)}")
    if center:
        queries, gallery = queries - queries.mean(axis=0), gallery - gallery.mean(axis=0)
    _, neighbours = search(queries, gallery, max(ks, default=1))
    matches = g_labels[neighbours] == q_labels[:, None]  # [Q, k_max], best first
    return {k: float(matches[:, :k].any(axis=1).mean()) for k in ks}


# --------------------------------------------------------------------------- as benchmark metrics


class ClipTop1(EvalSetMetric):
    """:func:`clip_top1` of clip ``logits`` [B, C] against ``label`` [B]."""

    name = "clip_top1"
    fields = ("logits", "label")

    def combine_set(self, rows: Rows) -> dict[str, float]:
        return {self.name: clip_top1(rows["logits"], rows["label"])}


class VideoTop1(EvalSetMetric):
    """:func:`video_top1`: the clip softmax averaged over each ``video_index``."""

    name = "video_top1"
    fields = ("logits", "label", "video_index")

    def combine_set(self, rows: Rows) -> dict[str, float]:
        return {self.name: video_top1(rows["logits"], rows["label"], rows["video_index"])}


class RetrievalRecall(BenchmarkMetric):
    """:func:`retrieval_recall_at_k` (``R@<k>``) of the videos of eval set ``query_set`` against
    those of ``gallery_set``; a video's feature is the mean of its clips' ``features`` [B, D]
    (:func:`video_features`), its label that of its clips."""

    fields = ("features", "label", "video_index")

    def __init__(self, query_set: str = "test", gallery_set: str = "gallery", ks: Sequence[int] = RETRIEVAL_KS,
                 center: bool = True) -> None:
        self.query_set, self.gallery_set = query_set, gallery_set
        self.ks, self.center = tuple(ks), center

    def videos(self, rows: Rows) -> tuple[Tensor, Tensor]:
        """(features, labels) per video of clip rows, videos in order of their index."""
        ids, features = video_features(rows["features"], rows["video_index"])
        return features, per_video_labels(rows["label"], rows["video_index"], ids)

    def combine(self, sets: Mapping[str, Rows]) -> dict[str, float]:
        missing = [name for name in (self.query_set, self.gallery_set) if name not in sets]
        if missing:
            raise ValueError(f"retrieval needs the eval sets {missing}; evaluated: {sorted(sets)}")
        recall = retrieval_recall_at_k(*self.videos(sets[self.query_set]), *self.videos(sets[self.gallery_set]),
                                       ks=self.ks, center=self.center)
        return {f"R@{k}": value for k, value in recall.items()}
