"""Cross-tile merging of detections in global pixel coordinates, incrementally.

Letters: n detections.

Each tile has run its own NMS; with the IoS metric (the default) a tile's nested duplicates
are dropped too (`suppress_nested`). What is left are objects seen by more than one tile (in the
overlaps) and objects cut by a tile edge. The merge clusters, per class, the views of one object
from different tiles (at most one view per tile): IoU between two whole views; IoS (intersection
over the smaller box) as soon as one view is truncated, since a fragment lies inside the whole.
A cluster is reported once. It takes the box of its best untruncated view; if every view is cut,
it takes the union of the fragments, which is the object's full extent. The score is the best of
the views.

Memory stays bounded: a detection that no other tile can see (inside its tile's exclusive zone)
is final at once. The rest wait only until every tile that could overlap them has been processed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.boxes import overlap_matrix


@dataclass
class Detections:
    """Final detections (global pixel xyxy)."""

    boxes: np.ndarray  # (n, 4) float64
    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) int64
    fused: np.ndarray | None = None  # (n,) bool: the box is a union of fragments

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64),
                          np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def concat(parts: list["Detections"]) -> "Detections":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Detections.empty()
        return Detections(np.concatenate([p.boxes for p in parts]),
                          np.concatenate([p.scores for p in parts]),
                          np.concatenate([p.labels for p in parts]))


def suppress_nested(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    threshold: float) -> np.ndarray:
    """Keep mask (n,) of one tile's detections: a detection is dropped when a better-scoring
    one of its class covers it by IoS >= `threshold` (intersection over the smaller box).

    The model's NMS works in IoU, which misses two kinds of duplicate: a partial box inside the
    whole one (IoS 1, IoU under 0.5) and two views of an object a few pixels wide, where a one
    pixel shift already drops IoU below 0.5. SAHI's greedy merge catches both by IoS 0.5."""
    keep = np.ones(len(scores), bool)
    for label in np.unique(labels):
        idx = np.nonzero(labels == label)[0]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        ios = overlap_matrix(boxes[idx], boxes[idx], np.ones((len(idx), len(idx)), bool))
        alive = np.ones(len(idx), bool)
        for i in range(len(idx)):
            if alive[i]:
                alive[i + 1:] &= ios[i, i + 1:] < threshold
        keep[idx] = alive
    return keep


class TileMerger:
    """Collects per-tile detections and releases merged, final ones.

    Args:
        metric: "iou" (IoS only between a fragment and another view) or "ios" (always IoS).
        threshold: overlap at which two views from different tiles are one object.
    """

    def __init__(self, metric: str = "iou", threshold: float = 0.5) -> None:
        if metric not in ("iou", "ios"):
            raise ValueError(f"merge metric must be iou or ios, got {metric!r}")
        self.metric = metric
        self.threshold = threshold
        self._boxes = np.zeros((0, 4))
        self._scores = np.zeros(0)
        self._labels = np.zeros(0, np.int64)
        self._tiles = np.zeros(0, np.int64)
        self._cut = np.zeros(0, bool)

    @property
    def pending(self) -> int:
        return len(self._scores)

    def top(self) -> float | None:
        """The topmost pixel row of any pending detection (None when none is pending)."""
        return float(self._boxes[:, 1].min()) if self.pending else None

    def add(self, tile_index: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
            truncated: np.ndarray, exclusive: np.ndarray) -> Detections:
        """Take one tile's detections; return those already final (in the exclusive zone)."""
        final = Detections(boxes[exclusive], scores[exclusive], labels[exclusive])
        keep = ~exclusive
        self._boxes = np.concatenate([self._boxes, boxes[keep]])
        self._scores = np.concatenate([self._scores, scores[keep]])
        self._labels = np.concatenate([self._labels, labels[keep]])
        self._tiles = np.concatenate([self._tiles, np.full(int(keep.sum()), tile_index)])
        self._cut = np.concatenate([self._cut, truncated[keep]])
        return final

    def snapshot(self) -> dict[str, list]:
        """Pending detections as plain lists (saved with --resume state)."""
        return {"boxes": self._boxes.tolist(), "scores": self._scores.tolist(),
                "labels": self._labels.tolist(), "tiles": self._tiles.tolist(),
                "cut": self._cut.tolist()}

    def restore(self, snap: dict[str, list]) -> None:
        """Pending detections back from `snapshot`."""
        self._boxes = np.array(snap["boxes"], np.float64).reshape(-1, 4)
        self._scores = np.array(snap["scores"], np.float64)
        self._labels = np.array(snap["labels"], np.int64)
        self._tiles = np.array(snap["tiles"], np.int64)
        self._cut = np.array(snap["cut"], bool)

    def release(self, below_y: float | None = None) -> Detections:
        """Merge pending detections; return the clusters lying wholly above `below_y` (all if None).

        Clusters reaching `below_y` or beyond stay pending, since a later tile may see them too.
        """
        if self.pending == 0:
            return Detections.empty()
        clusters = self._clusters()
        out_boxes, out_scores, out_labels, out_fused, done = [], [], [], [], []
        for members in clusters:
            if below_y is not None and self._boxes[members, 3].max() >= below_y:
                continue
            box, score = self._resolve(members)
            out_fused.append(bool(self._cut[members].all()))
            out_boxes.append(box)
            out_scores.append(score)
            out_labels.append(self._labels[members[0]])
            done.extend(members)
        keep = np.ones(self.pending, bool)
        keep[done] = False
        for name in ("_boxes", "_scores", "_labels", "_tiles", "_cut"):
            setattr(self, name, getattr(self, name)[keep])
        if not out_boxes:
            return Detections.empty()
        return Detections(np.array(out_boxes), np.array(out_scores),
                          np.array(out_labels, np.int64), np.array(out_fused, bool))

    def _clusters(self) -> list[list[int]]:
        """Views of one object: connected through overlaps >= threshold between different tiles.

        Fragments of an object cut by several tiles overlap in a chain (the object on a tile
        corner is cut four ways), so clusters are connected components. A component holding two
        whole views from the same tile is two objects; it is split greedily, at most one view per
        tile, seeds going whole views first, then by score.
        """
        clusters: list[list[int]] = []
        for label in np.unique(self._labels):
            idx = np.nonzero(self._labels == label)[0]
            cut = self._cut[idx]
            tiles = self._tiles[idx]
            ios = np.ones((len(idx), len(idx)), bool) if self.metric == "ios" else \
                cut[:, None] | cut[None, :]
            linked = overlap_matrix(self._boxes[idx], self._boxes[idx], ios) >= self.threshold
            linked &= tiles[:, None] != tiles[None, :]
            for comp in _components(linked):
                whole_tiles = tiles[comp][~cut[comp]]
                if len(whole_tiles) == len(set(whole_tiles.tolist())):
                    clusters.append([int(idx[m]) for m in comp])
                else:
                    clusters.extend([[int(idx[m]) for m in part]
                                     for part in self._split(comp, linked, cut, tiles)])
        return clusters

    def _split(self, comp: np.ndarray, linked: np.ndarray, cut: np.ndarray, tiles: np.ndarray
               ) -> list[list[int]]:
        order = comp[np.argsort(cut[comp], kind="stable")]  # whole views seed first
        assigned: set[int] = set()
        parts = []
        for i in order:
            if i in assigned:
                continue
            assigned.add(int(i))
            members, seen = [int(i)], {int(tiles[i])}
            for j in comp:
                if int(j) not in assigned and linked[i, j] and int(tiles[j]) not in seen:
                    assigned.add(int(j))
                    seen.add(int(tiles[j]))
                    members.append(int(j))
            parts.append(members)
        return parts

    def _resolve(self, members: list[int]) -> tuple[np.ndarray, float]:
        boxes = self._boxes[members]
        cut = self._cut[members]
        score = float(self._scores[members].max())
        if (~cut).any():
            whole = np.array(members)[~cut]
            best = whole[np.argmax(self._scores[whole])]
            return self._boxes[best], score
        return np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)]), score


def _components(linked: np.ndarray) -> list[np.ndarray]:
    """Connected components of a symmetric boolean adjacency matrix."""
    n = len(linked)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(linked, 1))):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[rj] = ri
    roots = np.array([find(i) for i in range(n)])
    return [np.nonzero(roots == r)[0] for r in np.unique(roots)]
