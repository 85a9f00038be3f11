"""Augmentation keeps boxes on their objects; dihedral views and their inverse; TTA's vote."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from querydet_cli.pipeline.tta import TTA_VIEWS, dihedral, undo_dihedral, vote
from querydet_cli.training.augment import augment
from querydet_cli.core.config import AugmentConfig

OFF = AugmentConfig(dihedral=False, brightness=0, contrast=0, saturation=0, hue=0, gamma=0,
                    blur_prob=0, noise_std=0, scale_jitter=0)


def marked(height=60, width=90):
    """A dark image with one bright rectangle and its box."""
    image = torch.full((3, height, width), 0.1)
    image[:, 12:30, 50:71] = 0.9  # rows 12..30, columns 50..71
    return image, torch.tensor([[50.0, 12.0, 71.0, 30.0]])


def bright_box(image: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("k,flip", TTA_VIEWS)
def test_each_dihedral_view_moves_the_box_with_its_object(k, flip):
    image, box = marked()
    view, moved = dihedral(image, box, k, flip)
    assert bright_box(view) == moved[0].tolist()
    assert torch.equal(undo_dihedral(moved, k, flip, 60, 90), box)


@pytest.mark.parametrize("seed", range(12))
def test_full_augmentation_keeps_the_box_on_the_square(seed):
    image, box = marked()
    settings = AugmentConfig(scale_jitter=0.5, noise_std=0.0, blur_prob=0.0, brightness=0.1,
                             contrast=0.1, saturation=0.1, hue=0.0, gamma=0.1)
    out, boxes, labels, ignore, scale = augment(image, box, torch.tensor([3]),
                                                torch.zeros(0, 4), settings, seed)
    assert labels.tolist() == [3] and len(ignore) == 0
    x1, y1, x2, y2 = boxes[0].tolist()
    assert x2 - x1 == pytest.approx(21 * scale, abs=1.0) or y2 - y1 == pytest.approx(21 * scale, abs=1.0)
    # the square is brighter than its surroundings and lies inside the box, edge for edge
    found = (out.mean(0) > (out.mean(0).max() + out.mean(0).min()) / 2).nonzero()
    got = [found[:, 1].min().item(), found[:, 0].min().item(),
           found[:, 1].max().item() + 1, found[:, 0].max().item() + 1]
    assert np.abs(np.array(got) - np.array([x1, y1, x2, y2])).max() <= 1.5


def test_photometric_parts_leave_geometry_alone_and_stay_in_range():
    image, box = marked()
    strong = replace(OFF, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1, gamma=0.5,
                     blur_prob=1.0, noise_std=0.1)
    out, boxes, _, _, scale = augment(image, box, torch.tensor([0]), torch.zeros(0, 4), strong, 3)
    assert out.shape == image.shape and scale == 1.0 and torch.equal(boxes, box)
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, image)


def test_the_same_seed_gives_the_same_view():
    image, box = marked()
    a = augment(image, box, torch.tensor([0]), torch.zeros(0, 4), AugmentConfig(), 41)
    b = augment(image, box, torch.tensor([0]), torch.zeros(0, 4), AugmentConfig(), 41)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_crop_keeps_whole_boxes_and_turns_cut_ones_into_ignore():
    image = torch.full((3, 200, 200), 0.1)
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [90.0, 90.0, 110.0, 110.0]])
    settings = replace(OFF, crop=100)
    for seed in range(30):
        _, kept, labels, ignore, _ = augment(image, boxes, torch.tensor([0, 1]),
                                             torch.zeros(0, 4), settings, seed)
        assert len(kept) == len(labels)
        assert ((kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1]) >= 200 - 1e-3).all()
        assert (kept >= 0).all() and (kept <= 100).all() and (ignore <= 100).all()


def test_vote_merges_views_and_scores_by_agreement():
    a = {"boxes": torch.tensor([[10.0, 10, 20, 20]]), "scores": torch.tensor([0.8]),
         "labels": torch.tensor([1])}
    b = {"boxes": torch.tensor([[11.0, 10, 21, 20], [50, 50, 60, 60]]),
         "scores": torch.tensor([0.8, 0.9]), "labels": torch.tensor([1, 1])}
    out = vote([a, b], 0.5)
    order = torch.argsort(out["boxes"][:, 0])
    assert out["boxes"][order][0].tolist() == pytest.approx([10.5, 10, 20.5, 20])
    assert out["scores"][order].tolist() == pytest.approx([0.8, 0.45])
    assert len(vote([a, b], 0.5, min_score=0.5)["scores"]) == 1
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    assert vote([empty, empty])["boxes"].shape == (0, 4)
