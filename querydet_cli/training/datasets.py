"""Training and evaluation data: VisDrone-DET and COCO-format annotations, images as tensors.

Every bad annotation (malformed line, zero or negative size, box outside the image, unknown
category, missing image) becomes a `Problem` naming the file and line; the sample or box is
skipped and the caller reports the problems. Nothing bad reaches the model.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from ..core.errors import QueryDetError

if TYPE_CHECKING:
    from ..core.config import AugmentConfig

VISDRONE_CLASSES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle",
                    "awning-tricycle", "bus", "motor")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


@dataclass
class Sample:
    """One image and its ground truth (xyxy pixels of the full image)."""

    image: Path
    boxes: np.ndarray  # (G, 4) float32
    labels: np.ndarray  # (G,) int64, 0-based class index
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (I, 4)
    image_id: int = 0
    width: int = 0
    height: int = 0
    # where a person reviewed the labels (a shapely geometry in these pixels): inside it the
    # boxes are the whole truth, outside it nothing is known; None: the whole image is labelled
    reviewed: Any = None


@dataclass
class Problem:
    where: str  # "file:line" or "file"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def read_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 (the first three bands), via rasterio / GDAL."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                bands = list(range(1, min(src.count, 3) + 1))
                data = src.read(bands)
    except RasterioIOError as err:
        raise QueryDetError(f"cannot read image {path}: {err}") from None
    if data.shape[0] == 1:
        data = np.repeat(data, 3, axis=0)
    elif data.shape[0] == 2:
        data = np.concatenate([data, data[:1]], axis=0)
    if data.dtype != np.uint8:
        lo, hi = np.percentile(data, (1, 99))
        data = np.clip((data.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255)
        data = data.astype(np.uint8)
    return data.transpose(1, 2, 0)


def _image_size(path: Path) -> tuple[int, int] | None:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.width, src.height
    except RasterioIOError:
        return None


def _check_box(box: list[float], width: int, height: int) -> str | None:
    x1, y1, x2, y2 = box
    if not all(np.isfinite(box)):
        return "box has NaN or Inf coordinates"
    if x2 <= x1 or y2 <= y1:
        return f"box has zero or negative size ({x2 - x1:g} x {y2 - y1:g})"
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return f"box {box} lies outside the {width}x{height} image"
    return None


def _usable_box(box: list[float], width: int, height: int, where: str,
                problems: list[Problem]) -> bool:
    """True if the box can be used; otherwise the reason is added to `problems`."""
    bad = _check_box(box, width, height)
    if bad:
        problems.append(Problem(where, bad + "; skipped"))
    return bad is None


def _clip(box: list[float], width: int, height: int) -> list[float]:
    return [max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3])]


def load_coco(json_path: str | Path, images_dir: str | Path | None = None
              ) -> tuple[list[Sample], list[str], list[Problem]]:
    """Samples, class names (in category-id order) and problems of a COCO-format dataset.

    `iscrowd` annotations become ignore regions. Images default to `images/` next to the JSON.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise QueryDetError(f"annotation file not found: {json_path}")
    try:
        data = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QueryDetError(f"{json_path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise QueryDetError(f"{json_path} is not COCO format (needs images, annotations, "
                            "categories)")
    images_dir = Path(images_dir) if images_dir else json_path.parent / "images"
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    names = [str(c["name"]) for c in cats]
    problems: list[Problem] = []
    by_image: dict[int, list[dict]] = {}
    for k, ann in enumerate(data["annotations"]):
        by_image.setdefault(ann.get("image_id"), []).append((k, ann))
    samples = []
    for img in data["images"]:
        path = images_dir / img["file_name"]
        if not path.is_file():
            problems.append(Problem(str(path), "image file missing; image skipped"))
            continue
        try:
            w, h = int(img["width"]), int(img["height"])
        except (KeyError, TypeError, ValueError):  # absent or not a number: read the file
            size = _image_size(path)
            if size is None:
                problems.append(Problem(str(path), "no width/height and unreadable; skipped"))
                continue
            w, h = size
        boxes, labels, ignore = [], [], []
        for k, ann in by_image.get(img["id"], []):
            where = f"{json_path}:annotations[{k}]"
            try:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                problems.append(Problem(where, "malformed bbox; skipped"))
                continue
            box = [x, y, x + bw, y + bh]
            if not _usable_box(box, w, h, where, problems):
                continue
            if ann.get("iscrowd", 0):
                ignore.append(_clip(box, w, h))
                continue
            category = ann["category_id"] if "category_id" in ann else None
            if category not in cat_index:
                problems.append(Problem(where, f"unknown category_id {category!r}; skipped"))
                continue
            boxes.append(_clip(box, w, h))
            labels.append(cat_index[category])
        sample = _sample(path, boxes, labels, ignore, int(img["id"]), w, h)
        sample.reviewed = coco_reviewed(img, f"{json_path}:images[{img['id']}]")
        samples.append(sample)
    return samples, names, problems


def coco_reviewed(img: dict, where: str):
    """An image's `reviewed_areas` ([[x, y, w, h], ...] in its pixels, as `view --edit` writes a
    COCO file) as one shapely geometry; None when it has none."""
    if "reviewed_areas" not in img:
        return None
    from shapely.geometry import box
    from shapely.ops import unary_union

    try:
        rects = [tuple(float(v) for v in r) for r in img["reviewed_areas"]]
        ok = all(len(r) == 4 and all(np.isfinite(r)) and r[2] > 0 and r[3] > 0 for r in rects)
    except (TypeError, ValueError):
        ok = False
    if not ok or not rects:
        raise QueryDetError(f"{where}: reviewed_areas must be a list of [x, y, width, height] "
                            "rectangles of positive size")
    return unary_union([box(x, y, x + w, y + h) for x, y, w, h in rects])


def coco_category_ids(json_path: str | Path) -> list[int]:
    """The category ids of a COCO JSON in the order `load_coco` numbers its classes."""
    data = json.loads(Path(json_path).read_text())
    return sorted(int(c["id"]) for c in data["categories"])


def _sample(path, boxes, labels, ignore, image_id, w, h) -> Sample:
    return Sample(path, np.asarray(boxes, np.float32).reshape(-1, 4),
                  np.asarray(labels, np.int64).reshape(-1),
                  np.asarray(ignore, np.float32).reshape(-1, 4), image_id, w, h)


def load_visdrone(root: str | Path) -> tuple[list[Sample], list[str], list[Problem]]:
    """VisDrone-DET: root/images/*.jpg and root/annotations/*.txt.

    Each line: x, y, w, h, score, category, truncation, occlusion. Categories 1-10 are the
    classes; category 0 (ignored regions), category 11 (others) and boxes with score 0 are kept
    as ignore regions, as the benchmark does: never trained on as objects, and detections inside
    them are not counted in evaluation.
    """
    root = Path(root)
    img_dir, ann_dir = root / "images", root / "annotations"
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise QueryDetError(f"{root} is not a VisDrone-DET folder (needs images/ and annotations/)")
    problems: list[Problem] = []
    samples = []
    for image_id, ann_path in enumerate(sorted(ann_dir.glob("*.txt")), start=1):
        matches = [p for p in img_dir.glob(ann_path.stem + ".*") if p.suffix.lower() in IMAGE_SUFFIXES]
        if not matches:
            problems.append(Problem(str(ann_path), "no image with this name in images/; skipped"))
            continue
        size = _image_size(matches[0])
        if size is None:
            problems.append(Problem(str(matches[0]), "unreadable image; skipped"))
            continue
        w, h = size
        boxes, labels, ignore = [], [], []
        # undecodable bytes become U+FFFD, so such a line is reported as malformed, not fatal
        text = ann_path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{ann_path}:{lineno}"
            parts = [p for p in line.replace(" ", "").split(",") if p != ""]
            try:
                x, y, bw, bh, score, cat = (float(v) for v in parts[:6])
            except ValueError:  # fewer than six fields, or a field that is not a number
                problems.append(Problem(where, f"malformed line {line.strip()[:80]!r}; skipped"))
                continue
            if not (np.isfinite(score) and np.isfinite(cat)):
                problems.append(Problem(where, "score or category is NaN or Inf; skipped"))
                continue
            box = [x, y, x + bw, y + bh]
            if not _usable_box(box, w, h, where, problems):
                continue
            cat = int(cat)
            if cat == 0 or cat == 11 or score == 0:
                ignore.append(_clip(box, w, h))
            elif 1 <= cat <= 10:
                boxes.append(_clip(box, w, h))
                labels.append(cat - 1)
            else:
                problems.append(Problem(where, f"unknown category {cat} (VisDrone has 0-11); "
                                               "skipped"))
        samples.append(_sample(matches[0], boxes, labels, ignore, image_id, w, h))
    return samples, list(VISDRONE_CLASSES), problems


def resize_by(image: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """Resize (3, H, W) by `scale` (bilinear); returns the image and the scale."""
    h, w = image.shape[1:]
    if abs(scale - 1.0) < 1e-6:
        return image, 1.0
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    return out, scale


class DetectionDataset(torch.utils.data.Dataset):
    """Images as (3, H, W) floats in [0, 1] with targets, resized to a short side or kept at
    their own pixel scale (`resize="native"`); in training, augmented (augment.py) or, with
    `augment=None`, horizontally flipped as before."""

    def __init__(self, samples: list[Sample], short_sides: tuple[int, ...], max_size: int,
                 train: bool = False, hflip: bool = True, seed: int = 0,
                 augment: "AugmentConfig | None" = None, resize: str = "short_side",
                 target_gsd: float | None = None) -> None:
        self.samples = samples
        self.short_sides = tuple(short_sides)
        self.max_size = max_size
        self.train = train
        self.hflip = hflip
        self.seed = seed
        self.augment = augment
        self.resize = resize
        # native scale at a model GSD: each georeferenced image brought to it (its own GSD
        # over the model's), the rest at their own pixels
        self.gsd_scales = _gsd_scales(samples, target_gsd) if resize == "native" and target_gsd \
            else [1.0] * len(samples)
        self.epoch = 0  # set by the training loop; augmentation is a function of (seed, epoch, i)

    def __len__(self) -> int:
        return len(self.samples)

    def _base_scale(self, rng: random.Random, h: int, w: int, i: int) -> float:
        """The resize before augmentation: to a short side, or to the model's GSD (capped by
        max_size)."""
        if self.resize == "native":
            return min(self.gsd_scales[i], self.max_size / max(h, w))
        side = rng.choice(self.short_sides) if self.train else self.short_sides[-1]
        return min(side / min(h, w), self.max_size / max(h, w))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.samples[i]
        seed = self.seed * 1_000_003 + self.epoch * 100_003 + i
        rng = random.Random(seed)
        pixels = read_image(s.image)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0  # (3, H, W)
        boxes, ignore = torch.from_numpy(s.boxes), torch.from_numpy(s.ignore)
        labels = torch.from_numpy(s.labels)
        scale = self._base_scale(rng, *image.shape[1:], i)
        if self.train and self.augment is not None:
            from .augment import augment

            image, boxes, labels, ignore, scale = augment(image, boxes, labels, ignore,
                                                          self.augment, seed, scale)
        else:
            image, scale = resize_by(image, scale)
            boxes, ignore = boxes * scale, ignore * scale
            if self.train and self.hflip and rng.random() < 0.5:
                image = image.flip(-1)
                w = image.shape[-1]
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
                ignore = torch.stack([w - ignore[:, 2], ignore[:, 1], w - ignore[:, 0],
                                      ignore[:, 3]], 1)
        target = {"boxes": boxes.reshape(-1, 4).float(), "labels": labels,
                  "ignore": ignore.reshape(-1, 4).float(), "scale": torch.tensor(scale),
                  "index": torch.tensor(i)}
        return image, target


def _gsd_scales(samples: list[Sample], target: float) -> list[float]:
    """Per sample: its GSD over `target` (how much to enlarge it), 1 when it has none."""
    from ..reading.gsd import MAX_RATIO, images_gsd

    scales = []
    for s in samples:
        gsd = images_gsd([s.image], limit=1)
        scale = gsd / target if gsd else 1.0
        scales.append(min(MAX_RATIO, max(1 / MAX_RATIO, scale)) if abs(scale - 1) > 1e-3 else 1.0)
    return scales


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)
