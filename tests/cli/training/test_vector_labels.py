"""Training from GIS labels: vector layers in any CRS, --init fine-tuning, ImageNet weights by
name (offline, through torchvision's cache), and original COCO category ids end to end."""

import json
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import torch
from rasterio.transform import Affine
from shapely.geometry import Point, box

from querydet_cli.training.chips import cut_chips
from querydet_cli.core.config import load_config
from querydet_cli.training.datasets import load_coco
from querydet_cli.pipeline.detect import DetectOptions, run_detect
from querydet_cli.pipeline.identity import coco_image_ids
from querydet_cli.runtimes.loading import load_model
from querydet_cli.core.errors import QueryDetError
from querydet_cli.training.train import train
from querydet_cli.training.vector_labels import load_vector_labels
from querydet_models.layers.backbones import (BackboneWeightsError, build_backbone, published_weights,
                                       weights_cache_file)
from tests.cli.oracle import paint, write_tif

# a 200 x 100 px raster at 0.5 m in UTM 33N; its neighbour to the east starts at x = 1100
WEST = Affine(0.5, 0, 1000, 0, -0.5, 2000)
EAST = Affine(0.5, 0, 1100, 0, -0.5, 2000)
OBJECTS = [(10, 10, 30, 30), (100, 40, 140, 60)]  # pixels of the west raster


def _rasters(tmp_path):
    w = write_tif(tmp_path / "west.tif", paint(200, 100, OBJECTS), WEST)
    e = write_tif(tmp_path / "east.tif", paint(200, 100, []), EAST)
    return str(w), str(e)


def _map_box(px, transform=WEST):
    x1, y1 = transform * (px[0], px[1])
    x2, y2 = transform * (px[2], px[3])
    return box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def test_polygons_in_another_crs_land_on_their_pixels(tmp_path):
    west, east = _rasters(tmp_path)
    layer = gpd.GeoDataFrame({"label": ["car", "truck"]},
                             geometry=[_map_box(o) for o in OBJECTS], crs="EPSG:32633")
    path = tmp_path / "labels.gpkg"
    layer.to_crs("EPSG:4326").to_file(path)  # stored in lon/lat
    found = load_vector_labels([west], path)
    assert found.class_names == ["car", "truck"] and found.outside == 0
    boxes = found.samples[0].boxes
    # lon/lat round trip: reprojected box bounds within a few centimetres (0.5 m pixels)
    assert np.allclose(boxes, np.array(OBJECTS, np.float32), atol=0.2)
    assert found.samples[0].labels.tolist() == [0, 1]


def test_points_become_boxes_of_point_size(tmp_path):
    west, _ = _rasters(tmp_path)
    centres = [WEST * (20, 20), WEST * (120, 50)]
    layer = gpd.GeoDataFrame({"species": ["oak", "pine"]},
                             geometry=[Point(c) for c in centres], crs="EPSG:32633")
    path = tmp_path / "trees.geojson"
    layer.to_crs("EPSG:4326").to_file(path, driver="GeoJSON")
    with pytest.raises(QueryDetError, match="--point-size"):
        load_vector_labels([west], path, label_field="species")
    found = load_vector_labels([west], path, label_field="species", point_size=10.0,
                               classes=["pine", "oak"])
    assert found.class_names == ["pine", "oak"]
    # 10 m = 20 px squares around the centres
    assert np.allclose(found.samples[0].boxes, [[10, 10, 30, 30], [110, 40, 130, 60]], atol=0.2)
    assert found.samples[0].labels.tolist() == [1, 0]


def test_label_across_two_rasters_and_labels_outside(tmp_path):
    west, east = _rasters(tmp_path)
    across = _map_box((180, 20, 230, 40))  # 20 px in the west raster, 30 px in the east one
    outside = _map_box((500, 500, 520, 520))
    layer = gpd.GeoDataFrame({"label": ["car", "car", "car"]},
                             geometry=[across, outside, _map_box(OBJECTS[0])], crs="EPSG:32633")
    path = tmp_path / "l.gpkg"
    layer.to_file(path)
    found = load_vector_labels([west, east], path)
    assert found.total == 3 and found.outside == 1
    w, e = found.samples
    # west holds 40% of it: an ignore region there; east holds 60%: an object
    assert np.allclose(w.ignore, [[180, 20, 200, 40]]) and len(w.boxes) == 1
    assert np.allclose(e.boxes, [[0, 20, 30, 40]]) and len(e.ignore) == 0


def test_tile_cli_from_layer_with_bounds(tmp_path):
    from typer.testing import CliRunner

    from querydet_cli.app import app

    west, east = _rasters(tmp_path)
    gpd.GeoDataFrame({"label": ["car", "truck"]}, geometry=[_map_box(o) for o in OBJECTS],
                     crs="EPSG:32633").to_file(tmp_path / "l.gpkg")
    result = CliRunner().invoke(app, ["tile", west, east, "--labels", str(tmp_path / "l.gpkg"),
                                      "--size", "64", "--overlap", "0", "--out",
                                      str(tmp_path / "chips"), "--bounds", "1000,1950,1050,2000"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "chips" / "annotations.json").read_text())
    # the bounds cover the west raster's first 100 x 100 px: only the first object's chip
    assert all(im["source"] == west for im in data["images"])
    assert max(im["window"][0] + im["window"][2] for im in data["images"]) <= 100
    assert {c["name"] for c in data["categories"]} == {"car", "truck"}
    # --out must not hold the sources
    result = CliRunner().invoke(app, ["tile", west, "--labels", str(tmp_path / "l.gpkg"),
                                      "--out", str(tmp_path)])
    assert isinstance(result.exception, QueryDetError)
    assert "holds the source" in str(result.exception)


def _tiny(cfg, out_names=None, **train):
    return replace(
        cfg, model=replace(cfg.model, backbone="resnet18", backbone_weights=None,
                           fpn_channels=16, head_convs=2),
        data=replace(cfg.data, synthetic_train_scenes=4, synthetic_size=96),
        train=replace(cfg.train, batch_size=2, max_iter=2, warmup_iters=1, steps=(1000,),
                      short_sides=(96,), max_size=96, checkpoint_period=2, log_period=1,
                      workers=0, **train))


def _coco_dataset(tmp_path, ids=(3, 8, 17)):
    """Three painted images with objects of categories `ids` (sparse COCO ids)."""
    (tmp_path / "images").mkdir()
    images, anns = [], []
    for i in range(3):
        objects = [(10 + 20 * i, 10, 30 + 20 * i, 40), (60, 50 + 10 * i, 90, 70 + 10 * i)]
        write_tif(tmp_path / "images" / f"im{i}.tif", paint(128, 128, objects))
        images.append({"id": 100 + 7 * i, "file_name": f"im{i}.tif", "width": 128, "height": 128})
        for k, (x1, y1, x2, y2) in enumerate(objects):
            anns.append({"id": len(anns) + 1, "image_id": 100 + 7 * i, "category_id": ids[k % 3],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0})
    cats = [{"id": c, "name": f"cls{c}"} for c in ids]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_coco_ids_survive_training_and_come_back(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _coco_dataset(tmp_path)
    cfg = _tiny(load_config("querydet_mobilenet_synthetic"))
    cfg = replace(cfg, data=replace(cfg.data, dataset="coco", train_annotations=str(gt),
                                    train_root=str(tmp_path / "images")))
    train(cfg, tmp_path / "run", quiet=True)
    model, trained = load_model(tmp_path / "run" / "model_final.pt")
    assert trained.class_ids == (3, 8, 17) and trained.class_names == ("cls3", "cls8", "cls17")
    inputs = sorted(str(p) for p in (tmp_path / "images").glob("*.tif"))
    ids = coco_image_ids(gt, inputs)
    assert ids == (100, 107, 114)
    out = tmp_path / "dets.json"
    run_detect(model, trained, inputs, str(out), "coco",
               DetectOptions(score_threshold=0.0, image_ids=ids), torch.device("cpu"))
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} <= {3, 8, 17}
    assert {r["image_id"] for r in results} <= {100, 107, 114}
    coco = COCO(str(gt))
    ev = COCOeval(coco, coco.loadRes(str(out)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] >= 0  # evaluated (not -1: ids matched)


def test_init_from_checkpoint_with_another_class_list(tmp_path, capsys):
    base = _tiny(load_config("querydet_mobilenet_synthetic"))
    train(base, tmp_path / "a", quiet=True)
    src = torch.load(tmp_path / "a" / "model_final.pt", weights_only=True)
    gt = _coco_dataset(tmp_path)
    cfg = replace(base, data=replace(base.data, dataset="coco", train_annotations=str(gt),
                                     train_root=str(tmp_path / "images")),
                  train=replace(base.train, freeze_backbone=True, max_iter=1, base_lr=1e-9))
    train(cfg, tmp_path / "b", quiet=True, init=tmp_path / "a" / "model_final.pt")
    err = capsys.readouterr().err
    assert "--init" in err and "copied" in err
    assert "classification predictor re-initialised" in err
    dst = torch.load(tmp_path / "b" / "model_final.pt", weights_only=True)
    sd_a, sd_b = src["model"], dst["model"]
    # the backbone (frozen) and the box head came from the first run; the classifier is new
    key = next(k for k in sd_a if k.startswith("backbone."))
    assert torch.equal(sd_a[key], sd_b[key])
    assert torch.allclose(sd_a["head.box.convs.0.weight"], sd_b["head.box.convs.0.weight"])
    last = max(int(k.split(".")[3]) for k in sd_b if k.startswith("head.cls.convs."))
    assert sd_b[f"head.cls.convs.{last}.weight"].shape[0] != sd_a[f"head.cls.convs.{last}.weight"].shape[0]
    with pytest.raises(QueryDetError, match="give one"):
        train(cfg, tmp_path / "b", resume=True, init=tmp_path / "a" / "model_final.pt")


def test_imagenet_weights_by_name_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = published_weights("resnet18", "imagenet")
    target = weights_cache_file(weights)
    assert str(tmp_path / "torch") in str(target)
    with pytest.raises(BackboneWeightsError) as info:  # offline, nothing in the cache
        build_backbone("resnet18", "imagenet")
    assert str(target.parent) in str(info.value) and target.name in str(info.value)
    assert "\n" not in str(info.value)
    # a generated state dict where torchvision's loader looks
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(reference.conv1.weight, 0.125)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), target)
    net = build_backbone("resnet18", "IMAGENET1K_V1")
    assert torch.all(net.stages[0][0].weight == 0.125)
    with pytest.raises(BackboneWeightsError, match="not a weight of resnet18"):
        build_backbone("resnet18", "IMAGENET1K_V9")


def test_checkpoint_never_reads_the_backbone_file_again(tmp_path):
    import torchvision

    from querydet_models.checkpoint import load_checkpoint

    start = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), start)
    cfg = _tiny(load_config("querydet_mobilenet_synthetic"))
    cfg = replace(cfg, model=replace(cfg.model, backbone_weights=str(start)))
    train(cfg, tmp_path / "run", quiet=True)
    start.unlink()
    model, cfg2 = load_model(tmp_path / "run" / "model_final.pt")  # no file needed
    assert cfg2.model.backbone_weights == str(start)  # recorded, and never opened again
    saved = load_checkpoint(tmp_path / "run" / "model_final.pt")["model"]
    heads = [k for k in saved if k.startswith("head.")]
    assert heads and all(torch.equal(model.state_dict()[k], saved[k]) for k in heads)
