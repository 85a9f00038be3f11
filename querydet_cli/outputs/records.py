"""One detection as it travels from the consumer to the journal, every writer and every reader.

Coordinates: `bbox` is the box in the source raster's own pixels (x1, y1, x2, y2; pixel-edge
coordinates: pixel (0, 0) spans [0, 1) x [0, 1)); `geometry` is its closed ring of corners in
`crs` (the raster's CRS, or EPSG:4326 lon/lat with --rfc7946), None for a source without a
georeference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

VIDEO_FIELDS = ("frame_index", "time_s", "track_id")  # set for video frames only


@dataclass(frozen=True)
class Detection:
    """One detection of one input.

    Attributes:
        source: the input's path as given.
        image_id: the input's COCO image id (its position from 1, or --coco-gt's id).
        class_id: the model's class index, from 0; None where a file records only the
            category (COCO results).
        class_name: the class's name.
        category_id: the dataset's category id of the class (COCO `category_id`).
        score: confidence in [0, 1].
        bbox: (x1, y1, x2, y2) in source pixels.
        geometry: closed ring [[x, y], ...] in `crs`; None without a georeference.
        crs: the CRS of `geometry` ("EPSG:32617", ...); None without a georeference.
        frame_index: for a video frame, its number in the video (from 0); else None.
        time_s: for a video frame, its time in the video in seconds; else None.
        track_id: with `--track`, the object's identity across frames (from 1); else None.
    """

    source: str
    image_id: int
    class_id: int | None
    class_name: str
    category_id: int
    score: float
    bbox: tuple[float, float, float, float]
    geometry: list[list[float]] | None = None
    crs: str | None = None
    frame_index: int | None = None
    time_s: float | None = None
    track_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (one line of the run's journal); the video fields only
        when set."""
        data = asdict(self)
        for key in VIDEO_FIELDS:
            if data[key] is None:
                del data[key]
        return data

    def video_fields(self) -> dict[str, Any]:
        """frame_index, time_s and track_id, those that are set (what outputs add for video)."""
        return {k: getattr(self, k) for k in VIDEO_FIELDS if getattr(self, k) is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Detection":
        """The record back from `to_json`'s object."""
        return cls(**(data | {"bbox": tuple(data["bbox"])}))
