import json

import numpy as np
import pytest
from PIL import Image

from querydet_cli.training.datasets import DetectionDataset, load_coco, load_visdrone
from querydet_cli.core.errors import QueryDetError


def _img(path, w=100, h=80):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)


def test_visdrone_parser_good_and_bad_lines(tmp_path):
    _img(tmp_path / "images" / "0001.jpg")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "0001.txt").write_text("\n".join([
        "10,10,20,15,1,4,0,0",      # car (category 4 -> class 3)
        "50,20,8,10,1,1,0,1",       # pedestrian
        "0,0,30,30,0,0,0,0",        # ignored region (category 0)
        "60,60,10,10,1,11,0,0",     # others -> ignore
        "70,5,6,6,0,4,0,0",         # score 0 -> ignore
        "5,5,0,10,1,4,0,0",         # zero width
        "200,200,10,10,1,4,0,0",    # outside the 100x80 image
        "10,10,5,5,1,12,0,0",       # unknown category
        "10,ten,5,5,1,4,0,0",       # malformed
        "",
    ]))
    (tmp_path / "annotations" / "0002.txt").write_text("1,1,5,5,1,1,0,0\n")  # no image
    samples, names, problems = load_visdrone(tmp_path)
    assert names[3] == "car" and len(names) == 10
    assert len(samples) == 1
    s = samples[0]
    assert s.labels.tolist() == [3, 0]
    assert s.boxes.tolist()[0] == [10, 10, 30, 25]
    assert len(s.ignore) == 3
    text = "\n".join(map(str, problems))
    assert "0001.txt:6: box has zero or negative size" in text
    assert "0001.txt:7: box" in text and "outside" in text
    assert "0001.txt:8: unknown category 12" in text
    assert "0001.txt:9: malformed line" in text
    assert "0002.txt: no image" in text


def test_coco_parser_reads_names_and_reports_problems(tmp_path):
    _img(tmp_path / "images" / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 2, "file_name": "missing.png", "width": 10, "height": 10}],
        "categories": [{"id": 7, "name": "boat"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 20, -4, 5]},
            {"id": 3, "image_id": 1, "category_id": 99, "bbox": [20, 20, 4, 5]},
            {"id": 4, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"id": 5, "image_id": 1, "category_id": 3, "bbox": "oops"},
        ]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    samples, names, problems = load_coco(tmp_path / "a.json")
    assert names == ["car", "boat"]  # category-id order
    assert len(samples) == 1 and samples[0].labels.tolist() == [1]
    assert len(samples[0].ignore) == 1
    text = "\n".join(map(str, problems))
    assert "annotations[1]: box has zero or negative size" in text
    assert "annotations[2]: unknown category_id 99" in text
    assert "annotations[4]: malformed bbox" in text
    assert "missing.png: image file missing" in text


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"),
                                           ('{"images": []}', "not COCO format")])
def test_coco_parser_refuses_bad_files(tmp_path, content, match):
    (tmp_path / "a.json").write_text(content)
    with pytest.raises(QueryDetError, match=match):
        load_coco(tmp_path / "a.json")
    with pytest.raises(QueryDetError, match="not found"):
        load_coco(tmp_path / "none.json")


def test_dataset_resize_and_flip_keep_boxes_on_objects(tmp_path):
    _img(tmp_path / "images" / "0001.jpg", 200, 100)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "0001.txt").write_text("10,20,30,10,1,4,0,0\n")
    samples, _, _ = load_visdrone(tmp_path)
    ds = DetectionDataset(samples, (50,), 1000, train=False)
    image, target = ds[0]
    assert image.shape == (3, 50, 100)
    assert target["boxes"].tolist() == [[5.0, 10.0, 20.0, 15.0]]
    flipped = DetectionDataset(samples, (50,), 1000, train=True, hflip=True, seed=0)
    seen = set()
    for epoch in range(8):
        flipped.epoch = epoch
        seen.add(tuple(flipped[0][1]["boxes"][0].tolist()))
    assert seen == {(5.0, 10.0, 20.0, 15.0), (80.0, 10.0, 95.0, 15.0)}
