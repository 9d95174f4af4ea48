"""UCF101 video metrics: clip/video top-1 and retrieval R@k on hand-worked cases, and R@k against a
brute-force numpy ranking of the full similarity matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.metrics.video import (
    clip_top1,
    retrieval_recall_at_k,
    video_features,
    video_scores,
    video_top1,
)


def logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probabilities`` (rows summing to 1)."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


# Three videos (ids 7, 3, 5; labels 0, 1, 2) of two clips each, the clips interleaved.
#   video 7: [.90 .05 .05] right, [.01 .60 .39] wrong -> mean [.455 .325 .22]  right
#   video 3: [.15 .80 .05] right, [.25 .70 .05] right -> mean [.20  .75  .05]  right
#   video 5: [.55 .05 .40] wrong, [.25 .05 .70] right -> mean [.40  .05  .55]  right
# Clip top-1 4/6, video top-1 3/3. Averaging logits (geometric mean of the probabilities) would get
# video 7 wrong: sqrt(.90 * .01) = .095 < sqrt(.05 * .60) = .173.
CLIP_PROBABILITIES = [
    [0.90, 0.05, 0.05],  # video 7
    [0.55, 0.05, 0.40],  # video 5
    [0.15, 0.80, 0.05],  # video 3
    [0.01, 0.60, 0.39],  # video 7
    [0.25, 0.70, 0.05],  # video 3
    [0.25, 0.05, 0.70],  # video 5
]
CLIP_VIDEO_IDS = torch.tensor([7, 5, 3, 7, 3, 5])
CLIP_LABELS = torch.tensor([0, 2, 1, 0, 1, 2])


def test_clip_and_video_top1_differ() -> None:
    logits = logits_of(CLIP_PROBABILITIES)
    assert clip_top1(logits, CLIP_LABELS) == pytest.approx(4 / 6)
    assert video_top1(logits, CLIP_LABELS, CLIP_VIDEO_IDS) == 1.0
    assert logits[[0, 3]].mean(dim=0).argmax() == 1  # video 7 by averaged logits: wrong


def test_video_scores_average_softmax_per_video() -> None:
    logits = logits_of(CLIP_PROBABILITIES) + torch.tensor([[0.0], [3.0], [-2.0], [5.0], [1.0], [-4.0]])
    ids, scores = video_scores(logits, CLIP_VIDEO_IDS)  # a constant per clip leaves its softmax as is
    assert ids.tolist() == [3, 5, 7]
    expected = [[0.20, 0.75, 0.05], [0.40, 0.05, 0.55], [0.455, 0.325, 0.22]]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))


def test_videos_with_different_clip_counts() -> None:
    # Video 0 (label 1) has three clips: [.7 .3], [.7 .3], [.05 .95] -> mean [.4833 .5167], right
    # though only one clip of three is; video 1 (label 0) has one clip [.8 .2], right.
    # Clip top-1 2/4, video top-1 2/2.
    logits = logits_of([[0.7, 0.3], [0.8, 0.2], [0.7, 0.3], [0.05, 0.95]])
    labels, ids = torch.tensor([1, 0, 1, 1]), torch.tensor([0, 1, 0, 0])
    assert clip_top1(logits, labels) == 0.5
    assert video_top1(logits, labels, ids) == 1.0
    torch.testing.assert_close(
        video_scores(logits, ids)[1], torch.tensor([[1.45 / 3, 1.55 / 3], [0.8, 0.2]], dtype=torch.float64)
    )


def test_video_top1_rejects_mixed_labels_in_a_video() -> None:
    labels = CLIP_LABELS.clone()
    labels[3] = 1  # the second clip of video 7
    with pytest.raises(ValueError, match="different labels"):
        video_top1(logits_of(CLIP_PROBABILITIES), labels, CLIP_VIDEO_IDS)


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        (torch.zeros(3, 2), torch.zeros(2, dtype=torch.long)),  # length mismatch
        (torch.zeros(3), torch.zeros(3, dtype=torch.long)),  # logits not [N, C]
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)),  # empty
    ],
)
def test_top1_shape_errors(logits: torch.Tensor, labels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="logits"):
        clip_top1(logits, labels)
    with pytest.raises(ValueError, match="logits"):
        video_top1(logits, labels, torch.zeros(len(labels), dtype=torch.long))


def test_video_top1_rejects_video_ids_of_another_length() -> None:
    with pytest.raises(ValueError, match="video_ids"):
        video_top1(logits_of(CLIP_PROBABILITIES), CLIP_LABELS, CLIP_VIDEO_IDS[:5])


def test_video_features_mean_of_clips() -> None:
    clips = torch.tensor([[1.0, 2.0], [4.0, 0.0], [3.0, 4.0], [0.0, 6.0], [2.0, 2.0]])
    ids, means = video_features(clips, torch.tensor([9, 4, 9, 4, 9]))
    assert ids.tolist() == [4, 9]
    # video 4: clips 1, 3 -> [2, 3]; video 9: clips 0, 2, 4 -> [6 / 3, 8 / 3]
    torch.testing.assert_close(means, torch.tensor([[2.0, 3.0], [2.0, 8 / 3]]))


# Retrieval in 2-D. Centred, the gallery lies at angles g0 0°, g1 90°, g2 180°, g3 270°, g4 135°
# (labels 0, 1, 1, 2, 0; mean (3, 3)) and the queries at q0 18.4°, q1 108.4°, q2 198.4°, q3 288.4°
# (labels 0, 0, 1, 4; mean (0, -10)). Ranked by angular distance:
#   q0 (0): g0 18.4 (0)  g1 71.6 (1)  g3 108.4 (2) g4 116.6 (0) g2 161.6 (1)  first hit 1
#   q1 (0): g1 18.4 (1)  g4 26.6 (0)  g2 71.6 (1)  g0 108.4 (0) g3 161.6 (2)  first hit 2
#   q2 (1): g2 18.4 (1)  g4 63.4 (0)  g3 71.6 (2)  g1 108.4 (1) g0 161.6 (0)  first hit 1
#   q3 (4): no gallery item of class 4                                         never
# R@1 2/4, R@2..R@5 3/4; k = 50 is clamped to the 5 gallery items. Precision@2 would be
# (1/2 + 1/2 + 1/2 + 0) / 4 = 3/8, not 3/4.
# Uncentred the gallery lies between 18° and 64° (g3 18.4, g0 31.0, g1 53.1, g2 56.3, g4 63.4) and
# the queries between 254° and 289°, so every query ranks it g3 (2), g0 (0), g1 (1), g2 (1), g4 (0):
# q0 and q1 first hit at 2, q2 at 3, q3 never -> R@1 0, R@2 2/4, R@3..R@5 3/4.
GALLERY_OFFSETS = np.array([(2, 0), (0, 1), (-1, 0), (0, -2), (-1, 1)], dtype=np.float64)
QUERY_OFFSETS = np.array([(3, 1), (-1, 3), (-3, -1), (1, -3)], dtype=np.float64)
GALLERY = GALLERY_OFFSETS + (3, 3)
QUERIES = QUERY_OFFSETS + (0, -10)
GALLERY_LABELS = np.array([0, 1, 1, 2, 0])
QUERY_LABELS = np.array([0, 0, 1, 4])
KS = (1, 2, 3, 5, 50)


def test_retrieval_centred() -> None:
    recall = retrieval_recall_at_k(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, KS)
    assert recall == {1: 0.5, 2: 0.75, 3: 0.75, 5: 0.75, 50: 0.75}


def test_retrieval_uncentred() -> None:
    recall = retrieval_recall_at_k(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, KS, center=False)
    assert recall == {1: 0.0, 2: 0.5, 3: 0.75, 5: 0.75, 50: 0.75}


def test_retrieval_centres_queries_and_gallery_separately() -> None:
    # Moving the queries alone changes nothing; centring both on their joint mean would (R@1 = 0).
    recall = retrieval_recall_at_k(QUERIES + (20, 0), QUERY_LABELS, GALLERY, GALLERY_LABELS, KS)
    assert recall == {1: 0.5, 2: 0.75, 3: 0.75, 5: 0.75, 50: 0.75}


def test_retrieval_accepts_tensors_and_is_scale_free() -> None:
    queries, gallery = torch.tensor(5 * QUERIES), torch.tensor(0.1 * GALLERY, dtype=torch.float32)
    recall = retrieval_recall_at_k(
        queries, torch.from_numpy(QUERY_LABELS), gallery, torch.from_numpy(GALLERY_LABELS), KS
    )
    assert recall == {1: 0.5, 2: 0.75, 3: 0.75, 5: 0.75, 50: 0.75}


def reference_recall(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...],
    center: bool,
) -> dict[int, float]:
    """R@k from a full similarity matrix sorted in numpy (VCOP's argsort of cosine distances)."""
    if center:
        queries, gallery = queries - queries.mean(axis=0), gallery - gallery.mean(axis=0)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    order = np.argsort(-(queries @ gallery.T), axis=1)
    return {
        k: float(np.mean([label in gallery_labels[row[:k]] for label, row in zip(query_labels, order)]))
        for k in ks
    }


@pytest.mark.parametrize("center", [True, False])
def test_retrieval_matches_brute_force(center: bool) -> None:
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(40, 8)) + rng.normal(size=8)
    gallery = rng.normal(size=(60, 8)) + rng.normal(size=8)
    query_labels, gallery_labels = rng.integers(0, 6, size=40), rng.integers(0, 6, size=60)
    ks = (1, 5, 10, 20, 50, 100)  # 100 > 60 gallery items: clamped, as the slice in the reference
    expected = reference_recall(queries, query_labels, gallery, gallery_labels, ks, center)
    assert retrieval_recall_at_k(queries, query_labels, gallery, gallery_labels, ks, center) == expected
    assert len(set(expected.values())) > 3  # the ks are told apart


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ((QUERIES, QUERY_LABELS[:3], GALLERY, GALLERY_LABELS), "query_labels"),
        ((QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS[:4]), "gallery_labels"),
        ((QUERIES, QUERY_LABELS, np.hstack([GALLERY, GALLERY]), GALLERY_LABELS), "gallery_features"),
        ((QUERIES[:0], QUERY_LABELS[:0], GALLERY, GALLERY_LABELS), "query_features"),
        ((QUERIES, QUERY_LABELS, GALLERY[:0], GALLERY_LABELS[:0]), "gallery_features"),
        ((QUERIES[:, 0], QUERY_LABELS, GALLERY, GALLERY_LABELS), "query_features"),
    ],
)
def test_retrieval_errors_name_the_argument(arguments: tuple[np.ndarray, ...], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        retrieval_recall_at_k(*arguments)


def test_retrieval_rejects_non_positive_k() -> None:
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall_at_k(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, ks=(0, 1))
