"""torchvision.transforms.v2 (querydet's augment.py) against albumentations: the same parts,
one process, milliseconds per image. albumentations is not a querydet dependency: install it
beside querydet to run this (`pip install albumentations`), then `python docs/measure_augment.py`.
"""
import statistics
import time

import numpy as np
import torch
torch.set_num_threads(2)
import albumentations as A
from querydet_cli.training.augment import augment
from querydet_cli.core.config import AugmentConfig

rng = np.random.default_rng(0)
cfg = AugmentConfig(blur_prob=0.5)
for side in (128, 512):
    img = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 40, 40], [50, 60, 90, 100]], np.float32)
    alb = A.Compose([A.D4(p=1), A.ColorJitter(0.2, 0.2, 0.2, 0.02, p=1), A.RandomGamma((80, 120), p=1),
                     A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 1.0), p=0.5),
                     A.GaussNoise(std_range=(0.02, 0.02), p=0.5), A.RandomScale(0.2, p=1)],
                    bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]))
    rounds = {"torchvision.v2": [], "albumentations": []}
    for r in range(5):
        t0 = time.perf_counter()
        for i in range(100):
            image = torch.from_numpy(img).permute(2, 0, 1).float() / 255  # as the dataset reads
            augment(image, torch.from_numpy(boxes), torch.tensor([0, 0]), torch.zeros(0, 4), cfg, r * 1000 + i)
        rounds["torchvision.v2"].append((time.perf_counter() - t0) / 100 * 1000)
        t0 = time.perf_counter()
        for i in range(100):
            out = alb(image=img, bboxes=boxes, labels=[0, 0])
            torch.from_numpy(out["image"]).permute(2, 0, 1).float() / 255
        rounds["albumentations"].append((time.perf_counter() - t0) / 100 * 1000)
    print(side, {k: round(statistics.median(v), 2) for k, v in rounds.items()}, "ms per image (median of 5 x 100)")
