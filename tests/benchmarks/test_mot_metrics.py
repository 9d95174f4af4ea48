"""MOTChallenge metrics through TrackEval: perfect tracks, hand-computed CLEAR and Identity counts
for an id switch and a false positive, the official removal of boxes on distractor classes, the
per-sequence combine step, and the offline scorer on a results folder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from benchmarks.metrics.mot import (TrackEvalMetric, combine, evaluate_sequence, score_results_folder, summary,
                                    write_ground_truth, write_seqmap, write_tracks)


def gt_row(frame, track, x, y, consider=1, cls=1, w=20, h=40):
    return [frame, track, x, y, w, h, consider, cls, 1.0]


def track_row(frame, track, x, y, w=20, h=40):
    return [frame, track, x, y, w, h, 1.0]


# Two pedestrians over 4 frames, far apart and moving right.
GT = np.array([gt_row(t, 1, 10 + 5 * t, 10) for t in range(1, 5)] + [gt_row(t, 2, 200 + 5 * t, 10) for t in range(1, 5)])


def test_perfect_tracks_score_one():
    tracks = np.array([track_row(f, 7 if k == 1 else 9, x, y) for f, k, x, y, *_ in GT])
    values = summary(evaluate_sequence("seq", GT, tracks, length=4))
    assert values["HOTA"] == pytest.approx(1.0) and values["MOTA"] == 1.0 and values["IDF1"] == 1.0
    assert values["IDSW"] == 0 and values["CLR_FP"] == 0 and values["MT"] == 2


def test_one_id_switch_and_one_false_positive_give_the_hand_computed_counts():
    """Object 1 tracked as id 10 in frames 1-2 and id 11 in frames 3-4; object 2 as id 20; one box
    far from everything in frame 2. CLEAR: TP 8, FN 0, FP 1, IDSW 1, MOTA = 1 - (0 + 1 + 1) / 8.
    Identity: GT 1 keeps 2 of its 4 frames (either id), GT 2 all 4: IDTP 6, IDFN 2, IDFP 9 - 6 = 3,
    IDF1 = 12 / (12 + 3 + 2)."""
    tracks = [track_row(t, 10 if t <= 2 else 11, 10 + 5 * t, 10) for t in range(1, 5)]
    tracks += [track_row(t, 20, 200 + 5 * t, 10) for t in range(1, 5)] + [track_row(2, 30, 500, 300)]
    values = summary(evaluate_sequence("seq", GT, np.array(tracks), length=4))
    assert (values["CLR_TP"], values["CLR_FN"], values["CLR_FP"], values["IDSW"], values["Frag"]) == (8, 0, 1, 1, 0)
    assert values["MOTA"] == pytest.approx(0.75)
    assert (values["IDTP"], values["IDFN"], values["IDFP"]) == (6, 2, 3)
    assert values["IDF1"] == pytest.approx(12 / 17)


def test_boxes_on_distractor_classes_are_removed_and_ignored_ground_truth_is_dropped():
    """Frame 1 adds a static person (class 7), a car (class 3) and a pedestrian with the consider
    flag 0, each with a tracker box on it: the box on the static person is removed, the one on
    the car stays a false positive, the flag-0 pedestrian is no ground truth (its box is a false
    positive: TrackEval removes boxes on distractor classes only)."""
    extra = np.array([gt_row(1, 3, 400, 100, cls=7), gt_row(1, 4, 400, 300, cls=3), gt_row(1, 5, 600, 300, consider=0)])
    tracks = [track_row(f, 7 if k == 1 else 9, x, y) for f, k, x, y, *_ in GT]
    tracks += [track_row(1, 40, 400, 100), track_row(1, 41, 400, 300), track_row(1, 42, 600, 300)]
    values = summary(evaluate_sequence("seq", np.concatenate([GT, extra]), np.array(tracks), length=4))
    assert (values["CLR_TP"], values["CLR_FN"], values["CLR_FP"]) == (8, 0, 2)


def test_sequences_combine_by_summed_counts_not_averaged_scores():
    perfect = evaluate_sequence("a", GT, np.array([track_row(f, k, x, y) for f, k, x, y, *_ in GT]), length=4)
    half = evaluate_sequence("b", GT, np.array([track_row(f, k, x, y) for f, k, x, y, *_ in GT if k == 1]), length=4)
    combined = summary(combine({"a": perfect, "b": half}))
    assert summary(half)["MOTA"] == pytest.approx(0.5)
    assert combined["MOTA"] == pytest.approx((8 + 4) / 16) and combined["CLR_FN"] == 4


@dataclass
class _Annotations:
    ground_truth: np.ndarray | None
    length: int


def test_sequence_metric_rows_combine_and_skip_sequences_without_ground_truth():
    metric = TrackEvalMetric()
    tracks = np.array([track_row(f, k, x, y) for f, k, x, y, *_ in GT])
    rows = metric.sequence_rows("a", _Annotations(GT, 4), tracks) + metric.sequence_rows("test", _Annotations(None, 4), tracks)
    assert [row["Sequence"] for row in rows] == ["a"]
    assert metric.combine_rows(rows)["IDF1"] == 1.0
    assert metric.tables(rows)["per_sequence"][0]["MOTA"] == 1.0


def test_offline_scorer_reads_a_results_folder_with_a_seqmap(tmp_path, capsys):
    write_ground_truth(tmp_path / "gt/seq-a", GT, length=4)
    write_ground_truth(tmp_path / "gt/seq-b", GT, length=4)
    write_tracks(tmp_path / "tracker/seq-a.txt", np.array([track_row(f, k, x, y) for f, k, x, y, *_ in GT]))
    write_tracks(tmp_path / "tracker/seq-b.txt", np.array([track_row(f, k, x, y) for f, k, x, y, *_ in GT if k == 1]))
    scores = score_results_folder(tmp_path / "gt", tmp_path / "tracker", out=tmp_path / "out", quiet=True)
    assert scores["seq-a"]["MOTA"] == 1.0 and scores["seq-b"]["MOTA"] == 0.5 and scores["COMBINED"]["MOTA"] == 0.75
    assert (tmp_path / "out/tracker/pedestrian_summary.txt").is_file()
    assert (tmp_path / "out/tracker/pedestrian_detailed.csv").is_file()
    write_seqmap(tmp_path / "seqmap.txt", ["seq-b"])
    only_b = score_results_folder(tmp_path / "gt", tmp_path / "tracker", seqmap=tmp_path / "seqmap.txt", quiet=True)
    assert set(only_b) == {"seq-b", "COMBINED"} and only_b["COMBINED"]["MOTA"] == 0.5
    from benchmarks.metrics.mot import main

    main([str(tmp_path / "gt"), str(tmp_path / "tracker")])
    assert "MOTA 0.750" in capsys.readouterr().out
