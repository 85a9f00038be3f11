"""Synthetic aerial scenes with small objects: georeferenced GeoTIFFs plus COCO JSON.

Deterministic by seed. Textured ground, roads, and five classes: cars and trucks (oriented along
the roads, in clusters such as queues and car parks, or scattered), people (a few pixels),
trees (round canopies) and buildings (the large objects, 40-110 px). Since no public dataset can
be downloaded at run time, this is what the tests, the bundled sample and the README demo use.
The benches' large rasters are built from these scenes too: `write_big_raster` (objects
everywhere) and `write_survey_raster` (objects in a tenth, a nodata collar around a rotated
footprint), written block by block, with their COCO truth.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("car", "truck", "person", "tree", "building")
# UTM zone 33N, 0.3 m pixels; scenes are laid side by side so each has its own georeference
CRS = "EPSG:32633"
PIXEL_SIZE = 0.3
ORIGIN = (500000.0, 4500000.0)


@dataclass
class SceneObject:
    label: int  # index into CLASSES
    box: tuple[float, float, float, float]  # xyxy pixels


def _ground(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency texture: a few octaves of upsampled noise, tinted grass to soil."""
    tex = np.zeros((size, size))
    for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25)):
        grid = rng.normal(0, 1, (cells + 1, cells + 1))
        img = Image.fromarray(((grid - grid.min()) / (np.ptp(grid) + 1e-9) * 255).astype(np.uint8))
        tex += weight * np.asarray(img.resize((size, size), Image.BILINEAR), float) / 255
    tex = (tex - tex.min()) / (np.ptp(tex) + 1e-9)
    grass = np.array([86, 112, 62], float)
    soil = np.array([128, 112, 84], float)
    base = grass[None, None] * (1 - tex[..., None]) + soil[None, None] * tex[..., None]
    return base + rng.normal(0, 6, (size, size, 3))


def _rotated_rect(cx: float, cy: float, length: float, width: float, angle: float
                  ) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    pts = [(-length / 2, -width / 2), (length / 2, -width / 2), (length / 2, width / 2),
           (-length / 2, width / 2)]
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _bbox(points: list[tuple[float, float]], size: int) -> tuple[float, float, float, float]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return (max(0.0, min(xs)), max(0.0, min(ys)), min(float(size), max(xs)),
            min(float(size), max(ys)))


def _free(box, taken, margin: float = 1.0) -> bool:
    x1, y1, x2, y2 = box
    return all(x2 + margin < a or a2 + margin < x1 or y2 + margin < b or b2 + margin < y1
               for a, b, a2, b2 in taken)


def make_scene(size: int = 512, seed: int = 0) -> tuple[np.ndarray, list[SceneObject]]:
    """One scene: an (H, W, 3) uint8 image and its objects. Same seed, same scene."""
    rng = np.random.default_rng(seed)
    img = _ground(rng, size)
    scene = _Scene(rng, size, Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    clustered = rng.random() < 0.6
    roads = scene.roads()
    scene.buildings()
    scene.vehicles(roads, clustered)
    if clustered and rng.random() < 0.5:
        scene.car_park()
    scene.trees(clustered)
    scene.people()
    out = np.asarray(scene.canvas, dtype=np.float64) + rng.normal(0, 3, (size, size, 3))
    return np.clip(out, 0, 255).astype(np.uint8), scene.objects


VEHICLE_COLOURS = [(200, 30, 30), (235, 235, 235), (25, 25, 30), (40, 70, 180), (220, 200, 40)]


class _Scene:
    """A canvas being drawn: each method adds one kind of thing, drawing from one generator
    in a fixed order (so a seed always gives the same scene)."""

    def __init__(self, rng: np.random.Generator, size: int, canvas: Image.Image) -> None:
        self.rng, self.size, self.canvas = rng, size, canvas
        self.draw = ImageDraw.Draw(canvas)
        self.objects: list[SceneObject] = []
        self.taken: list[tuple[float, float, float, float]] = []

    def roads(self) -> list[tuple[float, float, float, float]]:
        """Straight bands across the scene: (centre x, centre y, angle, width) of each."""
        rng, size = self.rng, self.size
        roads = []
        for _ in range(int(rng.integers(1, 3))):
            angle = float(rng.uniform(0, math.pi))
            cx, cy = rng.uniform(0.2, 0.8, 2) * size
            width = float(rng.uniform(14, 24))
            pts = _rotated_rect(cx, cy, size * 3, width, angle)
            self.draw.polygon(pts, fill=tuple(int(v) for v in rng.integers(100, 140, 3)))
            roads.append((cx, cy, angle, width))
        return roads

    def place(self, label: int, cx: float, cy: float, length: float, width: float,
              angle: float, color) -> None:
        """An oriented rectangle, unless it overlaps what is there."""
        pts = _rotated_rect(cx, cy, length, width, angle)
        box = _bbox(pts, self.size)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2 or not _free(box, self.taken):
            return
        self.draw.polygon(pts, fill=color)
        if label in (0, 1):  # a windscreen stripe makes vehicles' orientation visible
            f = _rotated_rect(cx + math.cos(angle) * length * 0.22,
                              cy + math.sin(angle) * length * 0.22, length * 0.15, width * 0.8,
                              angle)
            self.draw.polygon(f, fill=(30, 40, 50))
        self.taken.append(box)
        self.objects.append(SceneObject(label, box))

    def buildings(self) -> None:
        """The large objects."""
        rng, size = self.rng, self.size
        for _ in range(int(rng.integers(0, 3)) if size >= 128 else 0):
            side = float(rng.uniform(40, min(110.0, size * 0.4)))
            cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            roof = [(150, 70, 60), (170, 170, 175), (110, 100, 95)][int(rng.integers(0, 3))]
            self.place(4, cx, cy, side, side * rng.uniform(0.6, 1.0),
                       float(rng.uniform(0, math.pi)), roof)

    def vehicles(self, roads, clustered: bool) -> None:
        """Vehicles along roads: queues when clustered, a few when sparse."""
        rng, size = self.rng, self.size
        for cx, cy, angle, width in roads:
            n = int(rng.integers(8, 25)) if clustered else int(rng.integers(1, 6))
            for _ in range(n):
                t = float(rng.uniform(-size, size))
                lane = float(rng.uniform(-width / 4, width / 4))
                vx = cx + t * math.cos(angle) - lane * math.sin(angle)
                vy = cy + t * math.sin(angle) + lane * math.cos(angle)
                if not (4 < vx < size - 4 and 4 < vy < size - 4):
                    continue
                truck = rng.random() < 0.2
                length = float(rng.uniform(18, 30) if truck else rng.uniform(8, 15))
                wide = float(rng.uniform(7, 10) if truck else rng.uniform(4, 7))
                color = VEHICLE_COLOURS[int(rng.integers(0, len(VEHICLE_COLOURS)))]
                self.place(1 if truck else 0, vx, vy, length, wide,
                           angle + float(rng.normal(0, 0.05)), color)

    def car_park(self) -> None:
        """A grid of cars at any orientation."""
        rng, size = self.rng, self.size
        px, py = rng.uniform(0.15, 0.85, 2) * size
        angle = float(rng.uniform(0, math.pi))
        for i in range(int(rng.integers(2, 5))):
            for j in range(int(rng.integers(3, 7))):
                if rng.random() < 0.3:
                    continue
                ox, oy = i * 16.0, j * 9.0
                vx = px + ox * math.cos(angle) - oy * math.sin(angle)
                vy = py + ox * math.sin(angle) + oy * math.cos(angle)
                if 6 < vx < size - 6 and 6 < vy < size - 6:
                    self.place(0, vx, vy, float(rng.uniform(9, 13)), float(rng.uniform(5, 7)),
                               angle, VEHICLE_COLOURS[int(rng.integers(0, len(VEHICLE_COLOURS)))])

    def trees(self, clustered: bool) -> None:
        """Round canopies, in groves when clustered."""
        rng, size = self.rng, self.size
        groves = [rng.uniform(0, size, 2) for _ in range(int(rng.integers(1, 3)))]
        for _ in range(int(rng.integers(6, 30))):
            if clustered:
                gx, gy = groves[int(rng.integers(0, len(groves)))]
                cx, cy = np.clip(rng.normal([gx, gy], size * 0.08), 8, size - 8)
            else:
                cx, cy = rng.uniform(8, size - 8, 2)
            r = float(rng.uniform(4, 12))
            box = (max(0.0, cx - r), max(0.0, cy - r), min(float(size), cx + r),
                   min(float(size), cy + r))
            if not _free(box, self.taken):
                continue
            shade = int(rng.integers(25, 55))
            self.draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(shade, shade + 40, shade))
            self.taken.append(box)
            self.objects.append(SceneObject(3, box))

    def people(self) -> None:
        """A few pixels each, on the ground."""
        rng, size = self.rng, self.size
        for _ in range(int(rng.integers(2, 15))):
            cx, cy = rng.uniform(5, size - 5, 2)
            r = float(rng.uniform(2.0, 3.0))
            box = (cx - r, cy - r, cx + r, cy + r)
            if not _free(box, self.taken):
                continue
            self.draw.ellipse(box, fill=(230, 90, 40) if rng.random() < 0.5 else (240, 240, 80))
            self.taken.append(box)
            self.objects.append(SceneObject(2, box))


def write_dataset(out_dir: str | Path, num_scenes: int, size: int = 512, seed: int = 0,
                  prefix: str = "scene") -> Path:
    """Write `num_scenes` GeoTIFFs and `annotations.json` (COCO) under out_dir; returns the JSON.

    Scene i uses seed `seed * 100003 + i`, so datasets with different seeds do not share scenes.
    """
    import rasterio
    from rasterio.transform import from_origin

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_scenes):
        pixels, objects = make_scene(size, seed * 100003 + i)
        name = f"{prefix}_{seed}_{i:04d}.tif"
        transform = from_origin(ORIGIN[0] + i * size * PIXEL_SIZE, ORIGIN[1], PIXEL_SIZE,
                                PIXEL_SIZE)
        with rasterio.open(out / "images" / name, "w", driver="GTiff", width=size, height=size,
                           count=3, dtype="uint8", crs=CRS, transform=transform,
                           tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
            dst.write(pixels.transpose(2, 0, 1))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": obj.label + 1,
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0,
            })
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    path = out / "annotations.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(path)
    return path


def write_big_raster(path: Path, size: int, seed: int = 0, block: int = 512,
                     truth: Path | None = None) -> Path:
    """A size x size RGB GeoTIFF built from 16 synthetic scenes repeated, written block by block.

    With `truth`, also a COCO JSON of its objects (the scenes' boxes, shifted and clipped)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    made = [make_scene(block, seed * 100 + i) for i in range(16)]
    scenes = [img.transpose(2, 0, 1) for img, _ in made]
    annotations = []
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": CRS, "transform": from_origin(*ORIGIN, PIXEL_SIZE, PIXEL_SIZE),
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
               "BIGTIFF": "IF_SAFER"}
    with rasterio.open(path, "w", **profile) as dst:
        k = 0
        for y in range(0, size, block):
            for x in range(0, size, block):
                h, w = min(block, size - y), min(block, size - x)
                dst.write(scenes[k % 16][:, :h, :w], window=Window(x, y, w, h))
                for obj in made[k % 16][1]:
                    x1, y1 = obj.box[0] + x, obj.box[1] + y
                    x2, y2 = min(obj.box[2] + x, x + w), min(obj.box[3] + y, y + h)
                    if x2 - x1 >= 2 and y2 - y1 >= 2:
                        annotations.append({"id": len(annotations) + 1, "image_id": 1,
                                            "category_id": obj.label + 1,
                                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                                            "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                k += 1
    if truth is not None:
        from .synthetic import CLASSES

        truth.write_text(json.dumps({
            "images": [{"id": 1, "file_name": path.name, "width": size, "height": size}],
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}))
    return path


def write_survey_raster(path: Path, size: int, truth: Path, seed: int = 0, block: int = 512,
                        busy_fraction: float = 0.1, angle: float = 20.0) -> Path:
    """A survey-like GeoTIFF: objects in about `busy_fraction` of the blocks, empty ground
    elsewhere, and a nodata collar (0) around a footprint rotated by `angle` degrees; with its
    COCO ground truth (objects centred inside the footprint)."""
    import math

    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window


    rng = np.random.default_rng(seed)
    scenes = [make_scene(block, seed * 100 + i) for i in range(8)]
    grounds = [np.clip(_ground(np.random.default_rng(seed * 100 + 50 + i), block), 1, 255)
               .astype(np.uint8) for i in range(4)]
    c, half = size / 2, size * 0.36
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u = (x - c) * cos + (y - c) * sin
        v = -(x - c) * sin + (y - c) * cos
        return (np.abs(u) <= half) & (np.abs(v) <= half)

    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": CRS, "transform": from_origin(*ORIGIN, PIXEL_SIZE, PIXEL_SIZE),
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
               "nodata": 0, "BIGTIFF": "IF_SAFER"}
    annotations = []
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, size, block):
            for x in range(0, size, block):
                h, w = min(block, size - y), min(block, size - x)
                if rng.random() < busy_fraction:
                    img, objects = scenes[int(rng.integers(len(scenes)))]
                    img = np.clip(img, 1, 255).astype(np.uint8)
                else:
                    img, objects = grounds[int(rng.integers(len(grounds)))], []
                tile = img[:h, :w].transpose(2, 0, 1).copy()  # (3, h, w)
                ys, xs = np.mgrid[y:y + h, x:x + w]
                tile[:, ~inside(xs + 0.5, ys + 0.5)] = 0  # the nodata collar
                dst.write(tile, window=Window(x, y, w, h))
                for obj in objects:
                    x1, y1 = obj.box[0] + x, obj.box[1] + y
                    x2, y2 = min(obj.box[2] + x, x + w), min(obj.box[3] + y, y + h)
                    cx, cy = np.array([(x1 + x2) / 2]), np.array([(y1 + y2) / 2])
                    if x2 - x1 >= 2 and y2 - y1 >= 2 and inside(cx, cy)[0]:
                        annotations.append({"id": len(annotations) + 1, "image_id": 1,
                                            "category_id": obj.label + 1,
                                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                                            "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    truth.write_text(json.dumps({
        "images": [{"id": 1, "file_name": path.name, "width": size, "height": size}],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}))
    return path
