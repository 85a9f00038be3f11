"""Drawing: detections on an image and query heatmaps, as PIL images."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(255, 64, 64), (64, 200, 255), (255, 220, 0), (120, 255, 120), (255, 120, 255),
           (255, 160, 60), (160, 120, 255), (0, 255, 200), (255, 255, 255), (200, 200, 80)]


def draw_detections(pixels: np.ndarray, dets, names: list[str], scale: float = 1.0,
                    min_score: float = 0.3) -> Image.Image:
    """(H, W, 3) uint8 with boxes (xyxy, multiplied by `scale`) drawn per class colour."""
    img = Image.fromarray(pixels).convert("RGB")
    draw = ImageDraw.Draw(img)
    for box, score, label in zip(dets.boxes, dets.scores, dets.labels):
        if score < min_score:
            continue
        color = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=1)
        name = names[int(label)] if int(label) < len(names) else str(int(label))
        if x2 - x1 > 12:
            draw.text((x1, max(0.0, y1 - 10)), f"{name} {score:.2f}", fill=color)
    return img


def heatmap_image(heat: np.ndarray | None, width: int, height: int) -> Image.Image:
    """Query scores in [0, 1] as a black-red-yellow image of the given size (grey if none)."""
    if heat is None:
        return Image.new("RGB", (width, height), (60, 60, 60))
    h = np.clip(heat, 0, 1)
    rgb = np.stack([np.clip(h * 2, 0, 1), np.clip(h * 2 - 1, 0, 1), np.zeros_like(h)], -1)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    return img.resize((width, height), Image.NEAREST)
