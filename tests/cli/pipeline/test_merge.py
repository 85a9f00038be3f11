"""Cross-tile merging (merge.py): duplicate views of one object become one box, fragments its full
extent, and no seam leaves a duplicate."""

import numpy as np

from querydet_cli.pipeline.merge import TileMerger


def _add(m, tile, boxes, cut, labels=None):
    boxes = np.array(boxes, float).reshape(-1, 4)
    n = len(boxes)
    labels = np.zeros(n, np.int64) if labels is None else np.array(labels)
    return m.add(tile, boxes, np.full(n, 0.8), labels, np.array(cut, bool), np.zeros(n, bool))


def test_duplicate_views_become_one():
    m = TileMerger()
    _add(m, 0, [[100, 10, 110, 20]], [False])
    _add(m, 1, [[100.5, 10, 110.5, 20]], [False])
    out = m.release()
    assert len(out) == 1 and m.pending == 0


def test_fragments_become_the_full_extent():
    m = TileMerger()
    _add(m, 0, [[80, 10, 128, 30]], [True])  # cut by tile 0's right edge at 128
    _add(m, 1, [[96, 10, 140, 30]], [True])  # cut by tile 1's left edge at 96
    out = m.release()
    assert len(out) == 1 and out.boxes[0].tolist() == [80, 10, 140, 30]


def test_complete_view_beats_fragment():
    m = TileMerger()
    _add(m, 0, [[100, 10, 128, 30]], [True])
    _add(m, 1, [[100, 10, 120.5, 30]], [False])
    _add(m, 1, [[100, 10, 121, 30]], [False])  # same tile: never merged with its neighbour
    out = m.release()
    assert len(out) == 2
    assert sorted(out.boxes[:, 2].tolist()) == [120.5, 121]


def test_neighbours_and_classes_stay_apart():
    m = TileMerger()
    _add(m, 0, [[100, 10, 110, 20], [112, 10, 122, 20]], [False, False])
    _add(m, 1, [[100, 10, 110, 20], [112, 10, 122, 20]], [False, False], labels=[1, 0])
    out = m.release()
    assert len(out) == 3  # box 1 merged (class 0 twice); the class-1 view of box 0 stays


def test_release_holds_clusters_reaching_the_next_row():
    m = TileMerger()
    _add(m, 0, [[10, 10, 20, 20], [10, 90, 20, 110]], [False, True])
    out = m.release(below_y=100)
    assert len(out) == 1 and m.pending == 1
    out = m.release()
    assert len(out) == 1 and m.pending == 0


def test_no_seam_duplicates_with_objects_across_every_seam(tmp_path):
    """Objects on every vertical and horizontal seam and on every tile corner of a 4 x 4 tile
    grid: each is reported exactly once, with its full box."""

    import torch
    from rasterio.transform import Affine

    from querydet_cli.core.config import Config
    from querydet_cli.pipeline.detect import DetectOptions, run_detect

    from tests.cli.oracle import OracleModel, paint, read_ndjson, write_tif

    # 128 px tiles overlapping by 32 on 416 px: seams (overlap zones) at 96..128, 192..224, 288..320
    seams = (112, 208, 304)
    objects = []
    for s in seams:  # across each vertical and horizontal seam, away from the others
        for t in (40, 160, 256, 370):
            objects.append((s - 18, t - 8, s + 18, t + 8))
            objects.append((t - 8, s - 18, t + 8, s + 18))
        for s2 in seams:  # on each tile corner
            objects.append((s - 14, s2 - 14, s + 14, s2 + 14))
    objects = sorted(set(objects))
    # paint gives each object its own id (1..255) in band 1: keep them apart (no overlaps)
    path = write_tif(tmp_path / "seams.tif", paint(416, 416, objects), Affine(1, 0, 0, 0, -1, 0))
    out = tmp_path / "o.ndjson"
    run_detect(OracleModel(), Config(), [str(path)], str(out), "ndjson",
               DetectOptions(tile_size=128, overlap=32, batch_size=2), torch.device("cpu"))
    found = sorted(tuple(r["bbox"]) for r in read_ndjson(out))
    assert found == sorted(tuple(float(v) for v in o) for o in objects)


def test_nested_duplicates_in_a_tile_are_dropped_by_ios():
    from querydet_cli.pipeline.merge import suppress_nested

    boxes = np.array([[0, 0, 80, 110], [5, 0, 70, 70],  # a building and a partial box inside it
                      [200, 200, 205, 205], [201, 201, 206, 206],  # a 5 px object seen twice
                      [300, 300, 305, 305], [303, 300, 308, 305],  # two 5 px objects side by side
                      [10, 10, 60, 60]], float)  # inside the building, but another class
    scores = np.array([0.9, 0.5, 0.45, 0.4, 0.8, 0.7, 0.3])
    labels = np.array([1, 1, 0, 0, 0, 0, 2])
    keep = suppress_nested(boxes, scores, labels, 0.5)
    assert keep.tolist() == [True, False, True, False, True, True, True]
    # the better box stays whichever comes first
    order = np.arange(7)[::-1]
    assert suppress_nested(boxes[order], scores[order], labels[order], 0.5).tolist() == \
        keep[order].tolist()
