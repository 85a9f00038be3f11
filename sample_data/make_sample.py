"""Writes sample_scene.tif (a 1024x1024 synthetic aerial scene, EPSG:32633, 0.3 m pixels) and
sample_scene.json (its COCO annotations). Deterministic; not one of the training scenes (those
use seeds 0..399 of generator seed 0, this uses seed 777001).

Run from the repository root: .venv/bin/python sample_data/make_sample.py
"""

import json
from pathlib import Path

import rasterio
from rasterio.transform import from_origin

from querydet_cli.training.synthetic import CLASSES, CRS, ORIGIN, PIXEL_SIZE, make_scene

HERE = Path(__file__).resolve().parent
SIZE, SEED = 1024, 777001

pixels, objects = make_scene(SIZE, SEED)
with rasterio.open(HERE / "sample_scene.tif", "w", driver="GTiff", width=SIZE, height=SIZE,
                   count=3, dtype="uint8", crs=CRS,
                   transform=from_origin(ORIGIN[0], ORIGIN[1], PIXEL_SIZE, PIXEL_SIZE),
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
    dst.write(pixels.transpose(2, 0, 1))
coco = {
    "images": [{"id": 1, "file_name": "sample_scene.tif", "width": SIZE, "height": SIZE}],
    "annotations": [
        {"id": i + 1, "image_id": 1, "category_id": o.label + 1,
         "bbox": [round(o.box[0], 2), round(o.box[1], 2), round(o.box[2] - o.box[0], 2),
                  round(o.box[3] - o.box[1], 2)],
         "area": round((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]), 2), "iscrowd": 0}
        for i, o in enumerate(objects)],
    "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)],
}
(HERE / "sample_scene.json").write_text(json.dumps(coco, indent=1))
print(f"{len(objects)} objects")
