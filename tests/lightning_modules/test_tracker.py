"""FairMOT's association (card 6a (5)): ids kept on constant-velocity boxes with fixed
embeddings, a target found again under its id after an occlusion within the buffer, Kalman
gating rejecting a teleporting box, new tracks confirmed on their second frame, and the output
filters."""

from __future__ import annotations

import numpy as np

from lightning_modules.mot.tracker import JDETracker, KalmanFilter, TrackerOptions, assign, iou_distance

EMBEDDINGS = np.eye(3, 8)  # three distinct identities


def boxes_at(t: int, targets: list[int]) -> np.ndarray:
    """Targets k walking right at 4 px a frame, 30 x 75 boxes, 120 px apart."""
    return np.array([[50 + 4 * t, 100 + 120 * k, 80 + 4 * t, 175 + 120 * k] for k in targets], dtype=np.float64)


def run(tracker: JDETracker, t: int, targets: list[int]) -> dict[int, int]:
    """{target: output id} of frame t."""
    out = tracker.update(boxes_at(t, targets), np.full(len(targets), 0.9), EMBEDDINGS[targets])
    ids = {}
    for track_id, x, y, w, h, score in out:
        target = int(round((y - 100) / 120))
        ids[target] = int(track_id)
    return ids


def test_ids_are_kept_on_constant_velocity_targets():
    tracker = JDETracker()
    seen = [run(tracker, t, [0, 1, 2]) for t in range(30)]
    assert seen[0] == {0: 1, 1: 2, 2: 3}  # confirmed in the first frame
    assert all(frame == seen[0] for frame in seen)


def test_a_target_is_found_again_after_an_occlusion_within_the_buffer():
    tracker = JDETracker(TrackerOptions(track_buffer=30))
    for t in range(10):
        before = run(tracker, t, [0, 1])
    for t in range(10, 20):  # target 1 hidden for 10 frames
        hidden = run(tracker, t, [0])
        assert hidden == {0: before[0]}  # only target 0 is output, under its id
        assert [track.track_id for track in tracker.lost] == [before[1]]  # target 1 is kept as lost, not dropped
    after = run(tracker, 20, [0, 1])
    assert after == before


def test_a_target_hidden_longer_than_the_buffer_gets_a_new_id():
    tracker = JDETracker(TrackerOptions(track_buffer=5))
    for t in range(5):
        before = run(tracker, t, [0, 1])
    for t in range(5, 15):
        run(tracker, t, [0])
    run(tracker, 15, [0, 1])  # a new, unconfirmed track: not output yet
    after = run(tracker, 16, [0, 1])
    assert after[0] == before[0] and after[1] not in before.values()


def test_gating_rejects_a_teleporting_box_even_with_the_same_embedding():
    tracker = JDETracker()
    for t in range(10):
        before = run(tracker, t, [0])
    jump = boxes_at(10, [0]) + np.array([600, 0, 600, 0])
    tracker.update(jump, np.array([0.9]), EMBEDDINGS[[0]])
    out = tracker.update(jump + np.array([4, 0, 4, 0]), np.array([0.9]), EMBEDDINGS[[0]])
    assert len(out) == 1 and int(out[0, 0]) != before[0]
    kalman = KalmanFilter()
    mean, covariance = kalman.initiate(np.array([100.0, 100.0, 0.4, 75.0]))
    near, far = kalman.gating_distance(mean, covariance, np.array([[102.0, 101.0, 0.4, 75.0], [700.0, 100.0, 0.4, 75.0]]))
    assert near < 9.4877 < far


def test_new_tracks_wait_for_their_second_frame_and_small_or_wide_boxes_are_not_output():
    tracker = JDETracker()
    run(tracker, 0, [0])
    assert run(tracker, 1, [0, 1]) == {0: 1}  # target 1 started in frame 2: unconfirmed
    assert run(tracker, 2, [0, 1]) == {0: 1, 1: 2}
    filtered = JDETracker()
    small_and_wide = np.array([[0, 0, 8, 10], [200, 200, 300, 250]], dtype=np.float64)  # area 80; w/h = 2
    assert len(filtered.update(small_and_wide, np.array([0.9, 0.9]), EMBEDDINGS[:2])) == 0


def test_iou_distance_and_thresholded_assignment():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float64)
    b = np.array([[0, 0, 10, 5], [100, 100, 110, 110]], dtype=np.float64)
    np.testing.assert_allclose(iou_distance(a, b), [[0.5, 1.0], [1.0, 1.0]])
    matches, rows, cols = assign(iou_distance(a, b), threshold=0.5)
    assert matches == [(0, 0)] and rows == [1] and cols == [1]
