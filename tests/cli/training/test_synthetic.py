import json

import numpy as np
import rasterio

from querydet_cli.training.datasets import load_coco
from querydet_cli.training.synthetic import CLASSES, CRS, make_scene, write_dataset


def test_scenes_are_deterministic_by_seed():
    a, oa = make_scene(128, 5)
    b, ob = make_scene(128, 5)
    c, _ = make_scene(128, 6)
    assert np.array_equal(a, b) and [o.box for o in oa] == [o.box for o in ob]
    assert not np.array_equal(a, c)


def test_objects_small_and_large_inside_the_image():
    sizes = []
    for seed in range(12):
        _, objs = make_scene(256, seed)
        for o in objs:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256
            sizes.append(((x2 - x1) * (y2 - y1)) ** 0.5)
    sizes = np.array(sizes)
    assert (sizes < 8).any() and (sizes < 32).mean() > 0.7 and (sizes > 40).any()


def test_written_dataset_is_georeferenced_and_loads(tmp_path):
    ann = write_dataset(tmp_path, 3, 96, seed=2)
    samples, names, problems = load_coco(ann)
    assert names == list(CLASSES) and len(samples) == 3 and not problems
    with rasterio.open(samples[1].image) as src:
        assert src.crs.to_string() == CRS
        assert src.transform.a == 0.3 and src.transform.e == -0.3
        assert src.count == 3 and src.dtypes[0] == "uint8"
    data = json.loads(ann.read_text())
    assert all(a["bbox"][2] > 0 for a in data["annotations"])
