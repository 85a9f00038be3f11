"""Training augmentation for aerial imagery, boxes kept on their objects.

A nadir image has no "up": each training image is shown in one of the eight dihedral views
(90-degree rotations and flips), with photometric jitter (brightness, contrast, saturation, hue,
gamma), a mild blur and sensor noise now and then, a scale jitter around the image's scale (its
GSD relative to the model's) and a random crop. Geometry and colour go through
torchvision.transforms.v2, which moves `BoundingBoxes` with the pixels (measured against
albumentations on this CPU: see the README); the transpose that completes the dihedral group is
one line here, since v2 has none.

Randomness is a function of (seed, epoch, index) alone: the same sample gets the same view in a
resumed run, so `train --resume` repeats the uninterrupted run batch for batch.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import torch

from ..pipeline.tta import dihedral, dihedral_boxes

if TYPE_CHECKING:
    from ..core.config import AugmentConfig


def augment(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
            ignore: torch.Tensor, settings: AugmentConfig, seed: int, scale: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One random view of (3, H, W) in [0, 1] with its boxes (N, 4), labels (N,) and ignore
    regions (I, 4), resized by `scale` times the jitter; returns them and the scale applied."""
    from torchvision.transforms.v2 import functional as TF

    rng = random.Random(seed)
    if settings.scale_jitter > 0:
        span = math.log1p(settings.scale_jitter)
        scale *= math.exp(rng.uniform(-span, span))
    if abs(scale - 1.0) > 1e-6:
        size = [max(8, round(image.shape[-2] * scale)), max(8, round(image.shape[-1] * scale))]
        sy, sx = size[0] / image.shape[-2], size[1] / image.shape[-1]
        image = TF.resize(image, size, antialias=True)
        factor = torch.tensor([sx, sy, sx, sy])
        boxes, ignore = boxes * factor, ignore * factor
    if settings.dihedral:
        k, flip = rng.randrange(4), rng.random() < 0.5
        ignore = dihedral_boxes(ignore, k, flip, *image.shape[-2:])
        image, boxes = dihedral(image, boxes, k, flip)
    if settings.crop and max(image.shape[-2:]) > settings.crop:
        image, boxes, labels, ignore = _random_crop(image, boxes, labels, ignore, settings, rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.randrange(2 ** 31))
        image = _photometric(image, settings, rng)
    return image.clamp(0, 1), boxes, labels, ignore, scale


def _photometric(image: torch.Tensor, s: AugmentConfig, rng: random.Random) -> torch.Tensor:
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    if s.brightness or s.contrast or s.saturation or s.hue:
        image = v2.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue)(image)
    if s.gamma:
        image = TF.adjust_gamma(image, rng.uniform(1 - s.gamma, 1 + s.gamma))
    if s.grayscale_prob and rng.random() < s.grayscale_prob:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if s.blur_prob and rng.random() < s.blur_prob:
        image = v2.GaussianBlur(5, sigma=(0.1, 1.0))(image)
    if s.noise_std and rng.random() < 0.5:
        image = v2.GaussianNoise(0.0, s.noise_std, clip=True)(image)
    return image


def _random_crop(image, boxes, labels, ignore, s: AugmentConfig, rng: random.Random):
    """A crop of at most s.crop a side through v2's box-aware crop; a box left with less than
    `min_visible` of its area becomes an ignore region, so a cut object is never a negative."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    ch, cw = min(h, s.crop), min(w, s.crop)
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    canvas = (h, w)
    both = tv_tensors.BoundingBoxes(torch.cat([boxes, ignore]), format="XYXY", canvas_size=canvas)
    image = TF.crop(image, top, left, ch, cw)
    cropped = TF.clamp_bounding_boxes(TF.crop(both, top, left, ch, cw)).as_subclass(torch.Tensor)
    area = lambda b: (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # noqa: E731
    n = len(boxes)
    seen = area(cropped[:n]) / area(boxes).clamp(min=1e-6)
    keep = (seen >= s.min_visible) & (area(cropped[:n]) > 0)
    cut = ~keep & (area(cropped[:n]) > 0)
    old_ignore = cropped[n:][area(cropped[n:]) > 0]
    return image, cropped[:n][keep], labels[keep], torch.cat([old_ignore, cropped[:n][cut]])
