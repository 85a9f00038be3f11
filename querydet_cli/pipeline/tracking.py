"""Objects followed across the frames of a video (`detect --track`): ByteTrack's association.

Each frame's detections are split by score: the confident ones are matched first to every live
track (IoU with the track's Kalman-predicted box, one-to-one by the Hungarian algorithm), the
doubtful ones then to the tracks still unmatched (an object that blurs or is half hidden keeps
its track instead of breaking it). Boxes are compared grown by a buffer (C-BIoU), as objects a
few pixels wide move their own size between frames of a moving camera. A confident detection left over starts a track, which is
reported from its second match on (from the first in the first frame); a track unseen for
`max_lost` frames ends. Matching keeps classes apart.

Written here rather than taken from a library: ByteTrack's association is about a hundred
lines over SciPy's assignment, while supervision's ByteTrack brings OpenCV and boxmot brings a
deep-learning re-identification stack that small aerial objects give nothing to.
Letters: N detections, T tracks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

# Kalman filter on (cx, cy, aspect, height) and their velocities: noise relative to the height,
# as SORT / ByteTrack set it
_POS, _VEL = 1 / 20, 1 / 160
BUFFER = 0.3  # boxes grown by this share of their size on each side before matching (C-BIoU)


@dataclass
class Track:
    track_id: int
    label: int
    mean: np.ndarray  # (8,) cx, cy, a, h and their velocities
    cov: np.ndarray  # (8, 8)
    hits: int = 1
    lost: int = 0  # frames since it was last matched
    reported: bool = False

    def box(self) -> np.ndarray:
        cx, cy, a, h = self.mean[:4]
        w = a * h
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _to_xyah(box: np.ndarray) -> np.ndarray:
    w, h = box[2] - box[0], max(box[3] - box[1], 1e-6)
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, w / h, h])


_F = np.eye(8)
_F[:4, 4:] = np.eye(4)  # constant velocity, one frame per step
_H = np.eye(4, 8)


def _start(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = _to_xyah(box)
    h = z[3]
    std = [2 * _POS * h, 2 * _POS * h, 1e-2, 2 * _POS * h,
           10 * _VEL * h, 10 * _VEL * h, 1e-5, 10 * _VEL * h]
    return np.r_[z, np.zeros(4)], np.diag(np.square(std))


def _predict(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = mean[3]
    q = np.diag(np.square([_POS * h, _POS * h, 1e-2, _POS * h,
                           _VEL * h, _VEL * h, 1e-5, _VEL * h]))
    return _F @ mean, _F @ cov @ _F.T + q


def _correct(mean: np.ndarray, cov: np.ndarray, box: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    h = mean[3]
    r = np.diag(np.square([_POS * h, _POS * h, 1e-1, _POS * h]))
    s = _H @ cov @ _H.T + r
    gain = np.linalg.solve(s, _H @ cov).T  # (8, 4)
    mean = mean + gain @ (_to_xyah(box) - _H @ mean)
    return mean, cov - gain @ s @ gain.T


def _buffered(boxes: np.ndarray, buffer: float) -> np.ndarray:
    """Boxes grown by `buffer` of their width and height on every side (C-BIoU): small,
    fast-moving objects still overlap their predicted place."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return boxes + buffer * np.stack([-w, -h, w, h], 1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def _match(tracks: list[Track], boxes: np.ndarray, labels: np.ndarray, min_iou: float,
           buffer: float = BUFFER) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """One-to-one (track, detection) pairs of the same class whose buffered boxes overlap by
    IoU >= min_iou, the assignment of highest total IoU; and the unmatched track and detection
    positions."""
    from scipy.optimize import linear_sum_assignment

    predicted = np.array([t.box() for t in tracks]).reshape(-1, 4)
    iou = _iou(_buffered(predicted, buffer), _buffered(boxes.reshape(-1, 4), buffer))  # (T, N)
    same = np.array([t.label for t in tracks])[:, None] == labels[None, :]
    iou = np.where(same, iou, 0.0)
    pairs = []
    if iou.size:
        rows, cols = linear_sum_assignment(-iou)
        pairs = [(r, c) for r, c in zip(rows, cols) if iou[r, c] >= min_iou]
    matched_t = {r for r, _ in pairs}
    matched_d = {c for _, c in pairs}
    return (pairs, [i for i in range(len(tracks)) if i not in matched_t],
            [j for j in range(len(boxes)) if j not in matched_d])


class Tracker:
    """ByteTrack over one video's frames, in order.

    Args:
        high: a detection at or above this score is confident (it may start a track).
        low: below this a detection is ignored; between the two it only continues tracks.
        max_lost: frames a track survives unseen.
    """

    def __init__(self, high: float = 0.5, low: float = 0.1, max_lost: int = 30) -> None:
        self.high, self.low, self.max_lost = high, low, max_lost
        self.tracks: list[Track] = []
        self.next_id = 1
        self.frames = 0
        self.counted: Counter = Counter()  # reported tracks per class

    def update(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """One frame's detections (N, 4) xyxy, (N,), (N,): each one's track id, or 0 when it is
        not reported (a doubtful detection left over, or a track seen only once so far)."""
        boxes = np.asarray(boxes, float).reshape(-1, 4)
        scores, labels = np.asarray(scores, float), np.asarray(labels, int)
        ids = np.zeros(len(boxes), int)
        for t in self.tracks:
            t.mean, t.cov = _predict(t.mean, t.cov)
        strong = np.flatnonzero(scores >= self.high)
        weak = np.flatnonzero((scores >= self.low) & (scores < self.high))
        pairs, left, new = _match(self.tracks, boxes[strong], labels[strong], 0.2)
        self._hit(pairs, strong, boxes, ids)
        live = [self.tracks[i] for i in left if self.tracks[i].lost == 0]
        pairs2, _, _ = _match(live, boxes[weak], labels[weak], 0.5)
        matched2 = {id(live[r]) for r, _ in pairs2}
        for r, c in pairs2:
            self._continue(live[r], boxes[weak[c]], ids, weak[c])
        for i in left:
            if id(self.tracks[i]) not in matched2:
                self.tracks[i].lost += 1
        self.tracks = [t for t in self.tracks if t.lost <= self.max_lost]
        for j in new:
            k = strong[j]
            mean, cov = _start(boxes[k])
            track = Track(self.next_id, int(labels[k]), mean, cov)
            self.next_id += 1
            self.tracks.append(track)
            if self.frames == 0:
                self._report(track, ids, k)
        self.frames += 1
        return ids

    def _hit(self, pairs, rows, boxes, ids) -> None:
        for r, c in pairs:
            self._continue(self.tracks[r], boxes[rows[c]], ids, rows[c])

    def _continue(self, track: Track, box: np.ndarray, ids: np.ndarray, k: int) -> None:
        track.mean, track.cov = _correct(track.mean, track.cov, box)
        track.hits += 1
        track.lost = 0
        self._report(track, ids, k)

    def _report(self, track: Track, ids: np.ndarray, k: int) -> None:
        if not track.reported:
            track.reported = True
            self.counted[track.label] += 1
        ids[k] = track.track_id

    def snapshot(self) -> dict[str, Any]:
        """The tracker's state as JSON (a journal checkpoint), for --resume."""
        return {"next_id": self.next_id, "frames": self.frames,
                "counted": {str(k): v for k, v in self.counted.items()},
                "tracks": [{"id": t.track_id, "label": t.label, "mean": t.mean.tolist(),
                            "cov": t.cov.tolist(), "hits": t.hits, "lost": t.lost,
                            "reported": t.reported} for t in self.tracks]}

    def restore(self, state: dict[str, Any]) -> None:
        self.next_id, self.frames = state["next_id"], state["frames"]
        self.counted = Counter({int(k): v for k, v in state["counted"].items()})
        self.tracks = [Track(t["id"], t["label"], np.array(t["mean"]), np.array(t["cov"]),
                             t["hits"], t["lost"], t["reported"]) for t in state["tracks"]]
