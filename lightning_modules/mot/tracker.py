"""FairMOT's online association (ifzhang/FairMOT ``tracker/multitracker.py``, ``matching.py``,
``kalman_filter.py``, ``track.py``; method card 6a (5)), in plain numpy: no Lightning, no torch.

Per frame, given the detections kept by the network (boxes, scores, L2-normalised embeddings):

1. All tracked and lost tracks are predicted by a constant-velocity Kalman filter over
   (x, y, a, h) (centre, aspect ratio, height) and their velocities.
2. Association 1: cost = the cosine distance between a track's smoothed embedding (EMA 0.9) and
   a detection's, fused with the Kalman filter's Mahalanobis distance, cost = 0.98·cos +
   0.02·maha, infinite beyond χ²₀.₉₅ with 4 degrees of freedom (gating); Hungarian assignment
   below 0.4. Matched lost tracks are found again under their id.
3. Association 2: IoU distance between the remaining *tracked* tracks and detections, below 0.5;
   tracked tracks still unmatched become lost.
4. Unconfirmed tracks (started last frame) match the remaining detections by IoU distance below
   0.7, or are removed.
5. Detections left with a score ≥ ``new_track_score`` start tracks (confirmed at once in the
   first frame, else unconfirmed until matched again).
6. Lost tracks are removed after ``track_buffer`` frames × frame rate / 30; a tracked and a lost
   track overlapping with IoU > 0.85 keep only the longer.

The output is the confirmed tracked tracks, without boxes of area below ``min_box_area`` or
wider than ``max_aspect_ratio`` × their height (``track.py``). Assignment is SciPy's
``linear_sum_assignment`` on the thresholded cost, as the ``lap`` call of the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

CHI2_95_4DOF = 9.4877  # gating threshold of the Mahalanobis distance (x, y, a, h)


@dataclass(frozen=True)
class TrackerOptions:
    """The association's thresholds; the defaults are FairMOT's for MOT17 (card 6a (5))."""

    embedding_threshold: float = 0.4  # association 1: fused cost below
    motion_weight: float = 0.98  # λ of λ·cosine + (1 − λ)·Mahalanobis
    iou_threshold: float = 0.5  # association 2: IoU distance below
    unconfirmed_iou_threshold: float = 0.7  # unconfirmed tracks: IoU distance below
    new_track_score: float = 0.4  # detections start tracks at or above this score (FairMOT's conf_thres)
    track_buffer: int = 30  # frames a lost track is kept, at 30 frames per second
    embedding_momentum: float = 0.9  # EMA of a track's embedding
    duplicate_iou_distance: float = 0.15  # a tracked and a lost track closer than this are duplicates
    min_box_area: float = 100.0  # output filter
    max_aspect_ratio: float = 1.6  # output filter: width / height above it is dropped


class KalmanFilter:
    """Constant-velocity Kalman filter on (x, y, a, h, vx, vy, va, vh), the noise scaled by the
    box height (deep SORT's, which FairMOT uses)."""

    position_weight, velocity_weight = 1.0 / 20, 1.0 / 160

    def __init__(self) -> None:
        self.motion = np.eye(8)
        self.motion[:4, 4:] = np.eye(4)
        self.observation = np.eye(4, 8)

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = np.r_[measurement, np.zeros(4)]
        h = measurement[3]
        std = [2 * self.position_weight * h, 2 * self.position_weight * h, 1e-2, 2 * self.position_weight * h,
               10 * self.velocity_weight * h, 10 * self.velocity_weight * h, 1e-5, 10 * self.velocity_weight * h]
        return mean, np.diag(np.square(std))

    def predict(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = mean[3]
        std = [self.position_weight * h, self.position_weight * h, 1e-2, self.position_weight * h,
               self.velocity_weight * h, self.velocity_weight * h, 1e-5, self.velocity_weight * h]
        return self.motion @ mean, self.motion @ covariance @ self.motion.T + np.diag(np.square(std))

    def project(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = mean[3]
        std = [self.position_weight * h, self.position_weight * h, 1e-1, self.position_weight * h]
        return self.observation @ mean, self.observation @ covariance @ self.observation.T + np.diag(np.square(std))

    def update(self, mean: np.ndarray, covariance: np.ndarray, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        projected_mean, projected_cov = self.project(mean, covariance)
        gain = np.linalg.solve(projected_cov, (covariance @ self.observation.T).T).T
        return mean + gain @ (measurement - projected_mean), covariance - gain @ projected_cov @ gain.T

    def gating_distance(self, mean: np.ndarray, covariance: np.ndarray, measurements: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances [M] of measurements [M, 4] from the projected state."""
        projected_mean, projected_cov = self.project(mean, covariance)
        cholesky = np.linalg.cholesky(projected_cov)
        d = (measurements - projected_mean).T
        z = np.linalg.solve(cholesky, d)
        return np.sum(z * z, axis=0)


class TrackState(Enum):
    NEW = 0
    TRACKED = 1
    LOST = 2
    REMOVED = 3


def tlwh_to_xyah(tlwh: np.ndarray) -> np.ndarray:
    x, y, w, h = tlwh
    return np.array([x + w / 2, y + h / 2, w / h, h])


class Track:
    """One target: Kalman state, smoothed embedding, id and life cycle."""

    def __init__(self, tlwh: np.ndarray, score: float, embedding: np.ndarray, momentum: float) -> None:
        self.detection_tlwh = np.asarray(tlwh, dtype=np.float64)
        self.score, self.momentum = float(score), momentum
        self.embedding = embedding / np.linalg.norm(embedding)
        self.smoothed = self.embedding.copy()
        self.mean: Optional[np.ndarray] = None
        self.covariance: Optional[np.ndarray] = None
        self.track_id, self.state, self.is_activated = 0, TrackState.NEW, False
        self.frame_id = self.start_frame = 0

    @property
    def tlwh(self) -> np.ndarray:
        if self.mean is None:
            return self.detection_tlwh.copy()
        x, y, a, h = self.mean[:4]
        return np.array([x - a * h / 2, y - h / 2, a * h, h])

    @property
    def tlbr(self) -> np.ndarray:
        tlwh = self.tlwh
        return np.r_[tlwh[:2], tlwh[:2] + tlwh[2:]]

    def _update_embedding(self, embedding: np.ndarray) -> None:
        self.embedding = embedding / np.linalg.norm(embedding)
        self.smoothed = self.momentum * self.smoothed + (1 - self.momentum) * self.embedding
        self.smoothed /= np.linalg.norm(self.smoothed)

    def activate(self, kalman: KalmanFilter, track_id: int, frame_id: int) -> None:
        self.track_id = track_id
        self.mean, self.covariance = kalman.initiate(tlwh_to_xyah(self.detection_tlwh))
        self.state, self.is_activated = TrackState.TRACKED, frame_id == 1
        self.frame_id = self.start_frame = frame_id

    def update(self, kalman: KalmanFilter, detection: "Track", frame_id: int) -> None:
        """Follow a matched detection (found again when lost)."""
        self.mean, self.covariance = kalman.update(self.mean, self.covariance, tlwh_to_xyah(detection.detection_tlwh))
        self._update_embedding(detection.embedding)
        self.state, self.is_activated, self.score, self.frame_id = TrackState.TRACKED, True, detection.score, frame_id


def iou_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 − IoU [len(a), len(b)] of boxes (x1, y1, x2, y2)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], axis=1), np.prod(b[:, 2:] - b[:, :2], axis=1)
    return 1 - inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def assign(cost: np.ndarray, threshold: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Hungarian matching of the pairs whose cost is at most ``threshold``: (matches, unmatched
    rows, unmatched columns)."""
    if cost.size == 0:
        return [], list(range(cost.shape[0])), list(range(cost.shape[1]))
    bounded = np.where(np.isfinite(cost) & (cost <= threshold), cost, threshold + 1e4)
    rows, cols = linear_sum_assignment(bounded)
    matches = [(r, c) for r, c in zip(rows, cols) if bounded[r, c] <= threshold]
    matched_rows, matched_cols = {r for r, _ in matches}, {c for _, c in matches}
    return (matches, [r for r in range(cost.shape[0]) if r not in matched_rows],
            [c for c in range(cost.shape[1]) if c not in matched_cols])


class JDETracker:
    """FairMOT's tracker of one sequence (module docstring); :meth:`update` per frame returns
    the output tracks as rows [N, 6] (track id, x, y, w, h, score) in the frame's pixels."""

    def __init__(self, options: TrackerOptions = TrackerOptions(), frame_rate: float = 30.0) -> None:
        self.options, self.kalman = options, KalmanFilter()
        self.max_time_lost = int(frame_rate / 30.0 * options.track_buffer)
        self.tracked: list[Track] = []
        self.lost: list[Track] = []
        self.frame_id, self.next_id = 0, 1

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _embedding_cost(self, tracks: list[Track], detections: list[Track]) -> np.ndarray:
        if not tracks or not detections:
            return np.zeros((len(tracks), len(detections)))
        cost = np.maximum(0.0, cdist(np.stack([t.smoothed for t in tracks]), np.stack([d.embedding for d in detections]), "cosine"))
        measurements = np.stack([tlwh_to_xyah(d.detection_tlwh) for d in detections])
        for row, track in enumerate(tracks):
            gating = self.kalman.gating_distance(track.mean, track.covariance, measurements)
            cost[row, gating > CHI2_95_4DOF] = np.inf
            cost[row] = self.options.motion_weight * cost[row] + (1 - self.options.motion_weight) * gating
        return cost

    def update(self, boxes: np.ndarray, scores: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """One frame's detections: boxes [N, 4] (x1, y1, x2, y2), scores [N], embeddings [N, D]."""
        o = self.options
        self.frame_id += 1
        detections = [Track(np.r_[b[:2], b[2:] - b[:2]], s, e, o.embedding_momentum) for b, s, e in zip(boxes, scores, embeddings)]
        unconfirmed = [t for t in self.tracked if not t.is_activated]
        confirmed = [t for t in self.tracked if t.is_activated]
        pool = confirmed + [t for t in self.lost if t not in confirmed]
        for track in pool:  # 1. Kalman prediction (a lost track's height velocity is zeroed, as FairMOT)
            if track.state != TrackState.TRACKED:
                track.mean[7] = 0
            track.mean, track.covariance = self.kalman.predict(track.mean, track.covariance)
        activated, refound, lost, removed = [], [], [], []

        def follow(track: Track, detection: Track) -> None:
            (activated if track.state == TrackState.TRACKED else refound).append(track)
            track.update(self.kalman, detection, self.frame_id)

        # 2. embeddings with motion gating
        matches, unmatched_tracks, unmatched = assign(self._embedding_cost(pool, detections), o.embedding_threshold)
        for row, col in matches:
            follow(pool[row], detections[col])
        # 3. IoU on the tracked tracks left
        remaining = [pool[i] for i in unmatched_tracks if pool[i].state == TrackState.TRACKED]
        detections = [detections[i] for i in unmatched]
        cost = iou_distance(np.array([t.tlbr for t in remaining]).reshape(-1, 4), np.array([d.tlbr for d in detections]).reshape(-1, 4))
        matches, unmatched_tracks, unmatched = assign(cost, o.iou_threshold)
        for row, col in matches:
            follow(remaining[row], detections[col])
        for row in unmatched_tracks:
            remaining[row].state = TrackState.LOST
            lost.append(remaining[row])
        # 4. unconfirmed tracks
        detections = [detections[i] for i in unmatched]
        cost = iou_distance(np.array([t.tlbr for t in unconfirmed]).reshape(-1, 4), np.array([d.tlbr for d in detections]).reshape(-1, 4))
        matches, unmatched_unconfirmed, unmatched = assign(cost, o.unconfirmed_iou_threshold)
        for row, col in matches:
            unconfirmed[row].update(self.kalman, detections[col], self.frame_id)
            activated.append(unconfirmed[row])
        for row in unmatched_unconfirmed:
            unconfirmed[row].state = TrackState.REMOVED
            removed.append(unconfirmed[row])
        # 5. new tracks
        for col in unmatched:
            if detections[col].score >= o.new_track_score:
                detections[col].activate(self.kalman, self._new_id(), self.frame_id)
                activated.append(detections[col])
        # 6. lost tracks expire
        for track in self.lost:
            if self.frame_id - track.frame_id > self.max_time_lost:
                track.state = TrackState.REMOVED
                removed.append(track)
        tracked = [t for t in self.tracked if t.state == TrackState.TRACKED]
        self.tracked = _unique(tracked + activated + refound)
        self.lost = [t for t in self.lost + lost if t.state == TrackState.LOST and t not in self.tracked and t not in removed]
        self.tracked, self.lost = self._without_duplicates(self.tracked, self.lost)
        return self._output()

    def _without_duplicates(self, tracked: list[Track], lost: list[Track]) -> tuple[list[Track], list[Track]]:
        """A tracked and a lost track closer than ``duplicate_iou_distance``: the shorter goes."""
        cost = iou_distance(np.array([t.tlbr for t in tracked]).reshape(-1, 4), np.array([t.tlbr for t in lost]).reshape(-1, 4))
        drop_tracked, drop_lost = set(), set()
        for p, q in zip(*np.where(cost < self.options.duplicate_iou_distance)):
            if tracked[p].frame_id - tracked[p].start_frame > lost[q].frame_id - lost[q].start_frame:
                drop_lost.add(q)
            else:
                drop_tracked.add(p)
        return ([t for i, t in enumerate(tracked) if i not in drop_tracked], [t for i, t in enumerate(lost) if i not in drop_lost])

    def _output(self) -> np.ndarray:
        rows = []
        for track in self.tracked:
            if not track.is_activated:
                continue
            x, y, w, h = track.tlwh
            if w * h > self.options.min_box_area and w / h <= self.options.max_aspect_ratio:
                rows.append([track.track_id, x, y, w, h, track.score])
        return np.array(rows, dtype=np.float64).reshape(-1, 6)


def _unique(tracks: list[Track]) -> list[Track]:
    seen, out = set(), []
    for track in tracks:
        if track.track_id not in seen:
            seen.add(track.track_id)
            out.append(track)
    return out
