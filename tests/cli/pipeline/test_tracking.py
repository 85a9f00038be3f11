"""ByteTrack's association (tracking.py): identities survive a missed frame and a doubtful
detection, classes never share a track, a track is reported from its second sighting, and a
snapshot continues exactly where the tracker stopped."""

import numpy as np

from querydet_cli.pipeline.tracking import Tracker

STARTS = np.array([[10, 10, 30, 25], [50, 40, 70, 60], [100, 100, 112, 110], [200, 50, 230, 80]],
                  float)
LABELS = np.array([0, 0, 1, 0])


def _frame(f, noise=0.5, seed=0):
    rng = np.random.default_rng(seed + f)
    return STARTS + np.array([4 * f, f, 4 * f, f]) + rng.normal(0, noise, (4, 4))


def test_identities_survive_misses_and_doubtful_detections():
    tracker = Tracker(high=0.5, low=0.1)
    seen = []
    for f in range(15):
        boxes, scores = _frame(f), np.full(4, 0.9)
        keep = np.ones(4, bool)
        if f in (5, 6):
            keep[1] = False  # object 2 not detected for two frames
        if f == 8:
            scores[2] = 0.2  # object 3 doubtful: continues its track, starts none
        ids = np.zeros(4, int)
        ids[keep] = tracker.update(boxes[keep], scores[keep], LABELS[keep])
        seen.append(ids)
    seen = np.array(seen)  # (frames, objects)
    assert (seen[:, 0] == 1).all() and (seen[:, 2] == 3).all() and (seen[:, 3] == 4).all()
    assert (seen[[5, 6], 1] == 0).all() and (np.delete(seen[:, 1], [5, 6]) == 2).all()
    assert dict(tracker.counted) == {0: 3, 1: 1}


def test_a_new_object_is_reported_from_its_second_sighting():
    tracker = Tracker()
    tracker.update(STARTS[:1], [0.9], [0])
    first = tracker.update(np.r_[_frame(1)[:1], [[300, 300, 320, 320]]], [0.9, 0.9], [0, 0])
    second = tracker.update(np.r_[_frame(2)[:1], [[300, 300, 320, 320]]], [0.9, 0.9], [0, 0])
    assert first.tolist() == [1, 0] and second.tolist() == [1, 2]
    # a doubtful detection alone never starts a track
    assert tracker.update(np.array([[500, 500, 520, 520.0]]), [0.3], [0]).tolist() == [0]


def test_classes_never_share_a_track():
    tracker = Tracker()
    tracker.update(STARTS[:1], [0.9], [0])
    ids = tracker.update(STARTS[:1] + 1, [0.9], [1])  # same place, other class
    assert ids.tolist() == [0] and tracker.tracks[-1].label == 1 and tracker.tracks[-1].track_id == 2


def test_a_snapshot_continues_where_the_tracker_stopped():
    import json

    one, two = Tracker(), Tracker()
    for f in range(6):
        one.update(_frame(f), np.full(4, 0.9), LABELS)
    two.restore(json.loads(json.dumps(one.snapshot())))  # through a journal's JSON
    for f in range(6, 10):
        a = one.update(_frame(f), np.full(4, 0.9), LABELS)
        b = two.update(_frame(f), np.full(4, 0.9), LABELS)
        assert a.tolist() == b.tolist() == [1, 2, 3, 4]
    assert one.snapshot() == two.snapshot()
