"""DAVIS J&F against hand-worked cases of the official definitions: J's empty cases and void
pixels, seg2bmap, F's tolerance, the Decay bins, pooling over objects, the first/last frame rule,
the unsupervised matching, the index PNGs, and the offline scorer's official tables."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from benchmarks.metrics.davis import (
    boundary_map,
    boundary_measure,
    global_results,
    main,
    read_label_map,
    region_similarity,
    score_sequence,
    statistics,
    write_label_map,
)


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_region_similarity_empty_cases_and_void():
    empty, square = np.zeros((6, 6), bool), _square(6, 1, 1, 2)
    assert region_similarity(square, empty) == 0.0
    assert region_similarity(empty, square) == 0.0
    assert region_similarity(empty, empty) == 1.0  # an absent object predicted absent
    grown = square | _square(6, 1, 3, 1)  # one more pixel
    assert region_similarity(square, grown) == pytest.approx(4 / 5)
    assert region_similarity(square, grown, void=_square(6, 1, 3, 1)) == 1.0  # the extra pixels are void


def test_seg2bmap_marks_the_half_pixel_offset_boundary():
    pixel = np.zeros((5, 5), bool)
    pixel[2, 2] = True
    expected = np.zeros((5, 5), bool)
    expected[1:3, 1:3] = True  # the pixel and its west, north and north-west neighbours
    assert np.array_equal(boundary_map(pixel), expected)


def test_boundary_tolerance_is_0008_of_the_diagonal():
    """10 x 10 frames: radius ceil(0.008 x 14.1) = 1 pixel. A square moved by one pixel keeps
    every boundary pixel within it (F = 1); moved by three, only the crossings match."""
    square = _square(10, 2, 2, 4)
    assert boundary_measure(square, _square(10, 2, 3, 4)) == 1.0
    assert region_similarity(square, _square(10, 2, 3, 4)) == pytest.approx(12 / 20)
    far = boundary_measure(square, _square(10, 2, 5, 4))
    assert 0.0 < far < 0.6  # only the horizontal edges' overlap matches
    assert boundary_measure(square, np.zeros_like(square)) == 0.0  # GT boundary, none predicted
    assert boundary_measure(np.zeros_like(square), square) == 0.0
    assert boundary_measure(np.zeros_like(square), np.zeros_like(square)) == 1.0
    # At 480 x 854 the radius is 8: a 7-pixel shift of a large square still scores F = 1.
    big = np.zeros((480, 854), bool)
    big[100:300, 200:500] = True
    assert boundary_measure(big, np.roll(big, 7, axis=1)) == 1.0
    # Moved by 12: the vertical edges (2 x 200 pixels) are beyond the tolerance, the horizontal
    # ones (2 x 300) still match over 288 pixels: F is about 576 / 1000.
    assert boundary_measure(big, np.roll(big, 12, axis=1)) == pytest.approx(0.6, abs=0.02)


def test_statistics_decay_bins_share_their_edges():
    """10 frames: bin edges [0, 2, 5, 7, 9], bins 0-2 and 7-9: Decay = 0.8 - 0.1."""
    values = np.arange(9, -1, -1) / 10  # 0.9 ... 0.0
    mean, recall, decay = statistics(values)
    assert mean == pytest.approx(0.45) and recall == pytest.approx(0.4) and decay == pytest.approx(0.7)


def test_first_and_last_frames_are_not_scored_and_objects_pool_across_sequences():
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[:, 1:4, 1:4] = 1
    gt[:, 5:7, 5:7] = 2
    prediction = gt.copy()
    prediction[0] = 0  # wrong on the first and last frames only
    prediction[-1] = 0
    perfect = score_sequence("a", gt, prediction)
    assert [s.row()["J-Mean"] for s in perfect] == [1.0, 1.0] and len(perfect[0].j) == 2
    one = gt.copy()
    one[gt == 2] = 0
    missed = score_sequence("b", one, np.zeros_like(one))  # one object, never found
    rows = [s.row() for s in perfect + missed]
    assert [row["Sequence"] for row in rows] == ["a_1", "a_2", "b_1"]
    results = global_results(rows)
    assert results["J-Mean"] == pytest.approx(2 / 3)  # per object (1, 1, 0); per sequence would be 0.5
    assert results["J&F-Mean"] == pytest.approx((results["J-Mean"] + results["F-Mean"]) / 2)


def test_semi_supervised_voids_count_as_background_and_unsupervised_ones_do_not():
    gt = np.zeros((3, 8, 8), np.uint8)
    gt[:, 2:5, 2:5] = 1
    gt[:, 2:5, 5] = 255  # a void strip beside the object
    prediction = np.zeros_like(gt)
    prediction[:, 2:5, 2:6] = 1  # covers the void strip too
    semi = score_sequence("s", gt, prediction)[0]
    assert semi.j[0] == pytest.approx(9 / 12)
    unsupervised = score_sequence("s", gt, prediction, task="unsupervised")[0]
    assert np.allclose(unsupervised.j, 1.0) and len(unsupervised.j) == 3  # all frames, void left out


def test_unsupervised_proposals_are_matched_to_objects():
    gt = np.zeros((3, 8, 8), np.uint8)
    gt[:, 0:3, 0:3] = 1
    gt[:, 5:8, 5:8] = 2
    proposals = np.zeros_like(gt)
    proposals[gt == 1] = 3  # ids swapped and a spurious proposal 1
    proposals[gt == 2] = 2
    proposals[:, 4, 0] = 1
    scores = score_sequence("u", gt, proposals, task="unsupervised")
    assert [float(s.j.mean()) for s in scores] == [1.0, 1.0]


def test_a_prediction_with_more_objects_than_the_first_frame_is_an_error():
    gt = np.zeros((3, 4, 4), np.uint8)
    gt[:, 0, 0] = 1
    prediction = gt.copy()
    prediction[1, 3, 3] = 2
    with pytest.raises(ValueError, match="object id 2, but the first frame's annotation has 1 objects"):
        score_sequence("x", gt, prediction)


def test_index_pngs_round_trip_in_mode_p_and_rgb_ones_are_refused(tmp_path):
    labels = np.zeros((6, 7), np.uint8)
    labels[1:3, 2:5] = 1
    labels[4, :] = 2
    write_label_map(tmp_path / "00001.png", labels)
    with Image.open(tmp_path / "00001.png") as image:
        assert image.mode == "P" and image.getpalette()[3:6] == [128, 0, 0]  # DAVIS object 1 is dark red
    assert np.array_equal(read_label_map(tmp_path / "00001.png"), labels)
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png: a RGB PNG"):
        read_label_map(tmp_path / "rgb.png")


def test_offline_scorer_writes_the_official_tables(tmp_path, capsys):
    root, results = tmp_path / "DAVIS", tmp_path / "results"
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("walk\n")
    gt = np.zeros((5, 16, 16), np.uint8)
    gt[:, 4:10, 4:10] = 1
    for t in range(5):
        write_label_map(root / f"Annotations/480p/walk/{t:05d}.png", gt[t])
        write_label_map(results / f"walk/{t:05d}.png", gt[t] if t != 2 else np.zeros_like(gt[t]))
    main([str(root), str(results), "--out", str(tmp_path / "tables")])
    with open(tmp_path / "tables/global_results-val.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert float(table[0]["J-Mean"]) == pytest.approx(2 / 3, abs=1e-3)  # frames 1..3, one missed
    with open(tmp_path / "tables/per-sequence_results-val.csv") as f:
        assert list(csv.DictReader(f))[0]["Sequence"] == "walk_1"
    assert "Global results for val" in capsys.readouterr().out
    assert math.isclose(float(table[0]["J&F-Mean"]), (float(table[0]["J-Mean"]) + float(table[0]["F-Mean"])) / 2, abs_tol=1e-3)
