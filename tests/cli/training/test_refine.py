"""The second fine-tune and self-training: `train --init` on a model that already knows the class
takes the refine recipe and mixes the first site's chips in; `--pseudo-labels` labels new
imagery with the model and learns from it."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from querydet_models.checkpoint import load_checkpoint
from querydet_cli.core.config import load_config
from querydet_cli.core.resources import sample_model
from querydet_cli.training.chips import cut_chips
from querydet_cli.training.datasets import Sample
from querydet_cli.training.refine import knows_every_class, renumber
from tests.cli.training.test_finetune import _raster


def _train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "querydet_cli", "train", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def first_site(tmp_path_factory):
    """A model fine-tuned (one epoch) on the chips of one site, and the chips of another."""
    d = tmp_path_factory.mktemp("refine")
    for site in ("a", "b"):
        cut_chips([_raster(d / f"{site}.tif", size=192)], ["tree"], d / f"chips-{site}",
                  size=96, overlap=0)
    run = _train("--init", sample_model(), "--dataset", "coco", "--train-annotations",
                 d / "chips-a" / "annotations.json", "--epochs", 1, "--out", d / "first", cwd=d)
    assert run.returncode == 0, run.stderr
    assert "the refine recipe" not in run.stderr  # the bundled model knows synthetic trees only
    return d


def test_a_model_that_knows_the_class_refines_with_its_first_site_mixed_in(first_site, tmp_path):
    d = first_site
    run = _train("--init", d / "first" / "model_final.pt", "--dataset", "coco",
                 "--train-annotations", d / "chips-b" / "annotations.json", "--epochs", 1,
                 "--out", tmp_path / "second", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "already knows tree: the refine recipe" in run.stderr
    assert f"4 earlier chips of {d / 'chips-a' / 'annotations.json'} mixed in" in run.stderr
    t = load_checkpoint(tmp_path / "second" / "model_final.pt")["config"]["train"]
    assert (t["replay"], t["base_lr"], t["warmup_iters"]) == (1.0, 0.005, 1)
    assert json.loads(run.stdout)["iterations"] == 2  # (4 new + 4 earlier chips) / 4 a batch
    mixed = json.loads((tmp_path / "second" / "replay.json").read_text())
    assert sorted(im["file_name"] for im in mixed["images"]) == sorted(
        str((d / "chips-a" / "images" / im["file_name"]).resolve()) for im in
        json.loads((d / "chips-a" / "annotations.json").read_text())["images"])

    # the first site's chips gone: the new chips alone, said in one line
    moved = tmp_path / "moved"
    shutil.copytree(d / "chips-a", moved)
    shutil.rmtree(d / "chips-a")
    try:
        run = _train("--init", d / "first" / "model_final.pt", "--dataset", "coco",
                     "--train-annotations", d / "chips-b" / "annotations.json", "--epochs", 1,
                     "--out", tmp_path / "third", cwd=tmp_path)
    finally:
        shutil.copytree(moved, d / "chips-a")
    assert run.returncode == 0, run.stderr
    assert "is not here; training on the new chips alone" in run.stderr
    assert json.loads(run.stdout)["iterations"] == 1
    # --recipe finetune still chooses the first-site recipe
    run = _train("--init", d / "first" / "model_final.pt", "--dataset", "coco",
                 "--train-annotations", d / "chips-b" / "annotations.json", "--max-iter", 1,
                 "--recipe", "finetune", "--out", tmp_path / "fourth", cwd=tmp_path)
    assert run.returncode == 0 and "the refine recipe" not in run.stderr and "mixed in" not in run.stderr


def test_what_counts_as_knowing_a_class_and_renumbering_earlier_chips():
    cfg = load_config("querydet_mobilenet_synthetic")
    assert not knows_every_class(cfg, ["tree"])  # synthetic scenes teach no real tree
    from dataclasses import replace

    real = replace(cfg, data=replace(cfg.data, dataset="coco"))
    assert knows_every_class(real, ["tree", "car"]) and not knows_every_class(real, ["boat"])
    assert not knows_every_class(real, None)
    s = Sample("x.png", np.array([[0, 0, 5, 5], [1, 1, 6, 6]], np.float32), np.array([3, 0]))
    out = renumber(s, list(cfg.names()), ["tree"])
    assert out.labels.tolist() == [0] and out.boxes.tolist() == [[0, 0, 5, 5]]
    assert out.ignore.tolist() == [[1, 1, 6, 6]]  # a car is not taught as background


def test_self_training_labels_the_new_imagery_and_learns_from_it(first_site, tmp_path):
    d = first_site
    run = _train("--init", d / "first" / "model_final.pt", "--pseudo-labels", d / "b.tif",
                 "--pseudo-rounds", 2, "--max-iter", 1, "--out", tmp_path / "self", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    rounds = summary["self_training"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["iterations"] == 1 for r in rounds)
    said = [line for line in run.stderr.splitlines() if "self-training round" in line]
    assert len(said) == 2 and "pseudo-labels (score >= " in said[0]
    for r in rounds:
        chips = json.loads((tmp_path / "self" / "self-training" / f"round-{r['round']}" /
                            "chips" / "annotations.json").read_text())
        taught = {a["image_id"] for a in chips["annotations"] if not a["iscrowd"]}
        assert r["pseudo_labels"] > 0 and chips["images"]
        # chips around the pseudo-labels only: none without one
        assert taught == {im["id"] for im in chips["images"]}
    final = load_checkpoint(tmp_path / "self" / "model_final.pt")
    last = load_checkpoint(tmp_path / "self" / "self-training" / "round-2" / "model_final.pt")
    key = next(iter(final["model"]))
    assert np.array_equal(final["model"][key].numpy(), last["model"][key].numpy())
    # the rounds mixed in the first site's chips, not their own pseudo-labelled ones
    mixed = json.loads((tmp_path / "self" / "self-training" / "round-2" / "replay.json"
                        ).read_text())
    assert all("chips-a" in im["file_name"] for im in mixed["images"])


@pytest.mark.parametrize("args, said", [
    (["--pseudo-labels", "b.tif"], "--pseudo-labels needs --init"),
    (["--init", "first/model_final.pt", "--pseudo-labels", "missing.tif"], "missing.tif"),
    (["--init", "first/model_final.pt", "--pseudo-labels", "b.tif", "--pseudo-share", "1.5"],
     "--pseudo-share must be in (0, 1]"),
    (["--init", "first/model_final.pt", "--pseudo-labels", "corrupt.tif", "--max-iter", "1"],
     "corrupt.tif: not a readable raster"),
])
def test_self_training_refuses_in_one_line(first_site, args, said):
    (first_site / "corrupt.tif").write_bytes(b"not a raster")
    run = _train(*args, "--out", "never", cwd=first_site)
    assert run.returncode == 2 and said in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (first_site / "never").exists()
