"""`querydet train`, `eval` and `tile`: chips, models and their scores."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from .shared import (Dataset, Device, Precision, Protocol, Recipe, _folder_option,
                     _parse_bounds, _refuse_out_holding_sources, app, comma_list, log, pixels)
from ..core.errors import QueryDetError


@app.command()
def train(
    *,
    config: Annotated[Optional[str], typer.Option(help="A bundled config name (`querydet configs`) or a YAML path (default: the --init checkpoint's, else querydet_mobilenet_synthetic)")] = None,
    out: Annotated[Path, typer.Option(help="Output folder: last.pt, model_final.pt, metrics.jsonl")] = Path("runs/train"),
    init: Annotated[Optional[Path], typer.Option(help="Start from this checkpoint's weights (copied by name and shape; a new class list gets a fresh classifier)")] = None,
    freeze_backbone: Annotated[bool, typer.Option("--freeze-backbone", help="Train FPN and heads only")] = False,
    freeze_bn: Annotated[bool, typer.Option("--freeze-bn", help="Keep batch-norm statistics as loaded (backbones pretrained on ImageNet)")] = False,
    dataset: Annotated[Optional[Dataset], typer.Option(help="Overrides data.dataset")] = None,
    train_root: Annotated[Optional[str], typer.Option(help="VisDrone folder, or COCO image folder")] = None,
    train_annotations: Annotated[Optional[str], typer.Option(help="COCO JSON of the training set")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt on the same schedule")] = False,
    max_iter: Annotated[Optional[int], typer.Option(min=1, help="Override train.max_iter")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Override train.batch_size")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Override train.base_lr")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Override train.workers")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override train.seed")] = None,
    gsd: Annotated[Optional[float], typer.Option("--gsd", help="Metres per pixel of the training images when they carry no georeference (GeoTIFF chips from `querydet tile` record their own)")] = None,
    recipe: Annotated[Optional[Recipe], typer.Option(help="With --init the default is refine when the checkpoint (trained on real imagery) already knows every class of the data: half the rate, epochs over the new chips, the earlier chips mixed in; else finetune: epochs, warm-up, backbone at 0.1x, batch-norm statistics adapting (--freeze-bn keeps them), native scale, augmentation. config: the config's own schedule")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, max=100000, help="Override train.epochs (passes over the training set)")] = None,
    val_annotations: Annotated[Optional[str], typer.Option(help="COCO JSON of validation chips (e.g. tile's val.json): AP every --eval-period iterations, model_best.pt")] = None,
    val_root: Annotated[Optional[str], typer.Option(help="Image folder of --val-annotations (default: images/ beside it)")] = None,
    eval_period: Annotated[Optional[int], typer.Option(min=0, help="Override train.eval_period (iterations between validations; 0: none)")] = None,
    early_stop: Annotated[Optional[int], typer.Option(min=0, help="Override train.early_stop (validations without a better AP before stopping; 0: never)")] = None,
    pseudo_labels: Annotated[Optional[list[Path]], typer.Option(help="Self-training on this unlabelled imagery of the new site (repeat for several): the --init model labels it (TTA), the confident boxes are learnt, then again; with --train-annotations too, a last refine run on those labels follows")] = None,
    pseudo_rounds: Annotated[int, typer.Option(min=1, max=20, help="Rounds of --pseudo-labels")] = 2,
    pseudo_share: Annotated[float, typer.Option(help="--pseudo-labels: boxes scoring at least this share of the best box are labels; from half of that up, ignore regions")] = 0.9,
) -> None:
    """Train QueryDet (RetinaNet, FCOS or Faster R-CNN host, from the config) or a baseline (multi-GPU: torchrun --nproc_per_node N -m querydet_cli train ...)."""
    from ..core.config import with_changes

    _folder_option(out, "--out")
    pseudo = _pseudo_labelling(init, pseudo_labels, pseudo_rounds, pseudo_share, resume) \
        if pseudo_labels else None
    cfg = _base_config(config, init, freeze_backbone, freeze_bn, gsd, dataset, train_root,
                       train_annotations, val_annotations, val_root)
    corrections = train_annotations is not None or train_root is not None or dataset is not None
    chosen = recipe or _default_recipe(cfg, init, quiet=pseudo is not None and not corrections)
    cfg = _with_recipe(cfg, chosen, validation=val_annotations is not None)
    if max_iter is not None and epochs is None:  # a count of iterations replaces the epochs
        cfg = with_changes(cfg, "train", epochs=0)
    if epochs is not None and max_iter is None:  # the epochs asked for, not a recipe's cap
        max_iter = 100_000_000
    schedule = {"max_iter": max_iter, "batch_size": batch_size, "base_lr": lr,
                "workers": workers, "seed": seed, "epochs": epochs}
    cfg = with_changes(cfg, "train", eval_period=eval_period, early_stop=early_stop, **schedule)
    from ..runtimes.loading import resolve_device
    from ..training.train import train as run_training

    dev = resolve_device(device.value)
    if pseudo is not None:
        from ..runtimes.loading import load_model
        from ..training.selftrain import self_train

        if max_iter is not None and epochs is None:
            schedule["epochs"] = 0
        summary = self_train(cfg, init, pseudo, out, str(dev),
                             lambda weights, dev: load_model(weights, dev, "torch", None),
                             run_training, corrections,
                             {k: v for k, v in schedule.items() if v is not None})
    else:
        summary = run_training(cfg, out, device=str(dev), resume=resume, init=init)
    print(json.dumps(summary))


def _base_config(config: str | None, init: Path | None, freeze_backbone: bool, freeze_bn: bool,
                 gsd: float | None, dataset, train_root: str | None,
                 train_annotations: str | None, val_annotations: str | None,
                 val_root: str | None):
    """The config a run starts from (--config, else --init's checkpoint's, else the default)
    with the command's model and data options."""
    from ..core.config import config_from_dict, load_config, with_changes

    if config is None and init is not None:  # fine-tune: the checkpoint's model and schedule
        from querydet_models.checkpoint import load_checkpoint

        cfg = config_from_dict(load_checkpoint(init)["config"])
    else:
        cfg = load_config(config or "querydet_mobilenet_synthetic")
    if freeze_backbone:
        cfg = with_changes(cfg, "train", freeze_backbone=True)
    if freeze_bn:
        cfg = with_changes(cfg, "train", freeze_bn=True)
    from ..reading.gsd import check_input_gsd

    check_input_gsd(gsd, "--gsd")
    if dataset is not None or train_root is not None or train_annotations is not None:
        # other training data: the GSD comes from it (or --gsd), not from --init's checkpoint
        from dataclasses import replace

        cfg = replace(cfg, data=replace(cfg.data, gsd=None))
    cfg = with_changes(cfg, "data", dataset=dataset.value if dataset else None,
                       train_root=train_root, train_annotations=train_annotations, gsd=gsd)
    if val_annotations is not None:
        cfg = with_changes(cfg, "data", val_annotations=val_annotations, val_root=val_root)
    _refuse_unread_data(cfg.data.dataset, {"--train-annotations": train_annotations,
                                           "--train-root": train_root,
                                           "--val-annotations": val_annotations,
                                           "--val-root": val_root})
    return cfg


def _with_recipe(cfg, chosen: Recipe, validation: bool):
    """The config with the recipe's schedule (finetune, refine) or as it is (config)."""
    if chosen == Recipe.finetune:
        from ..training.train import finetune_recipe

        return finetune_recipe(cfg, validation)
    if chosen == Recipe.refine:
        from ..training.refine import refine_recipe

        return refine_recipe(cfg, validation)
    return cfg


def _pseudo_labelling(init: Path | None, rasters: list[Path], rounds: int, share: float,
                      resume: bool):
    """train --pseudo-labels' settings (training/selftrain.py), checked before anything runs:
    an --init model to label with, imagery that is there, a fresh run."""
    from ..reading.inputs import expand_inputs
    from ..training.selftrain import PseudoLabelling

    if init is None:
        raise QueryDetError("--pseudo-labels needs --init: the model that labels the imagery")
    if resume:
        raise QueryDetError("--pseudo-labels starts its rounds afresh; --resume is for one run")
    found = expand_inputs([str(r) for r in rasters])
    missing = [f for f in found if not Path(f).is_file()]
    if missing:
        raise QueryDetError(f"--pseudo-labels {missing[0]}: file not found")
    return PseudoLabelling(tuple(found), rounds, share)


def _default_recipe(cfg, init: Path | None, quiet: bool = False) -> Recipe:
    """config without --init; with it, refine when the checkpoint already knows every class of
    the data (training/refine.py), else finetune. Says which on stderr unless `quiet`."""
    if init is None:
        return Recipe.config
    from querydet_models.checkpoint import load_checkpoint

    from ..core.config import config_from_dict
    from ..training.refine import data_class_names, knows_every_class

    try:
        known = config_from_dict(load_checkpoint(init)["config"])
    except Exception:  # a missing or broken checkpoint: training's --init check says so
        return Recipe.finetune
    names = data_class_names(cfg)
    if knows_every_class(known, names):
        if not quiet:
            print(f"querydet: --init {init} already knows {', '.join(names)}: the refine "
                  "recipe (--recipe finetune for the first-site one)", file=sys.stderr)
        return Recipe.refine
    return Recipe.finetune


def _refuse_unread_data(dataset: str, given: dict[str, str | None]) -> None:
    """Data options that this run's dataset would not read are a usage error, not ignored:
    synthetic scenes are generated, so a COCO file or folder given with them means the user
    forgot --dataset."""
    named = [name for name, value in given.items() if value is not None]
    if named and dataset == "synthetic":
        raise QueryDetError(f"{named[0]} is read with --dataset coco or visdrone, but this run's "
                            "dataset is synthetic (generated scenes): add --dataset coco")


@app.command(name="eval")
def evaluate(
    *,
    weights: Annotated[Path, typer.Option(help="Checkpoint (its embedded config is used)")],
    protocol: Annotated[Protocol, typer.Option(help="Evaluation protocol")] = Protocol.coco,
    sigma: Annotated[str, typer.Option(help="Query thresholds to sweep, comma-separated")] = "0.05,0.1,0.15,0.2,0.3",
    config: Annotated[Optional[str], typer.Option(help="Take data.* from this config instead of the checkpoint's")] = None,
    dataset: Annotated[Optional[Dataset], typer.Option(help="Overrides data.dataset")] = None,
    val_root: Annotated[Optional[str], typer.Option(help="VisDrone folder, or COCO image folder")] = None,
    val_annotations: Annotated[Optional[str], typer.Option(help="COCO JSON of the evaluation set")] = None,
    max_dets: Annotated[Optional[int], typer.Option(min=1, help="COCO maxDets (default 100)")] = None,
    out: Annotated[Path, typer.Option(help="Folder for report.json, tradeoff.png, visualisations")] = Path("runs/eval"),
    save_vis: Annotated[bool, typer.Option(help="Write a few images with detections and query heatmaps, and vis/review.html (querydet view: true positives, false positives and misses)")] = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    precision: Annotated[Optional[Precision], typer.Option(help="Inference precision (default: the checkpoint's, auto)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
) -> None:
    """Evaluate a checkpoint (COCO or VisDrone protocol), dense and CSQ over a sigma sweep."""
    sigmas = list(comma_list(sigma, "--sigma", float, "numbers separated by commas"))
    if not sigmas or any(not 0 <= s <= 1 or s != s for s in sigmas):
        raise QueryDetError(f"--sigma: every value must be in [0, 1], got {sigma!r}")
    _folder_option(out, "--out")
    from ..core.config import load_config, with_changes
    from ..runtimes.loading import load_model, resolve_device
    from ..training.evaluation import evaluate as run_eval
    from ..training.evaluation import format_table, plot_tradeoff, save_review, save_visualisations
    from ..training.train import load_split, report_problems

    dev = resolve_device(device.value)
    model, cfg = load_model(weights, dev)
    if precision is not None:
        model.set_precision(precision.value)
    log.info("precision: %s", model.precision)
    if config is not None:
        from dataclasses import replace

        cfg = replace(cfg, data=load_config(config).data)
    cfg = with_changes(cfg, "data", dataset=dataset.value if dataset else None, val_root=val_root,
                       val_annotations=val_annotations)
    _refuse_unread_data(cfg.data.dataset, {"--val-annotations": val_annotations,
                                           "--val-root": val_root})
    out.mkdir(parents=True, exist_ok=True)
    samples, _, problems = load_split(cfg, "val", out)
    report_problems(problems)
    if not samples:
        raise QueryDetError("no usable evaluation images (see the warnings above)")
    report = run_eval(model, cfg, samples, protocol=protocol.value, sigmas=sigmas, device=dev,
                      max_dets=max_dets)
    from querydet_models.checkpoint import save_json_atomic

    save_json_atomic(out / "report.json", report)
    plot_tradeoff(report, out / "tradeoff.png")
    if save_vis:
        save_visualisations(model, cfg, samples, out / "vis", dev, sigmas[len(sigmas) // 2])
        save_review(model, cfg, samples, out / "vis", dev, sigmas[len(sigmas) // 2])
    if json_out:
        print(json.dumps(report))
    else:
        print(format_table(report))
        print(f"wrote {out / 'report.json'} and {out / 'tradeoff.png'}", file=sys.stderr)


@app.command()
def tile(
    rasters: Annotated[Optional[list[Path]], typer.Argument(help="GeoTIFFs to cut, with --labels (a GIS layer)")] = None,
    *,
    out: Annotated[Path, typer.Option(help="Output folder: images/ and annotations.json (COCO)")],
    labels: Annotated[Optional[Path], typer.Option(help="GIS layer of boxes, polygons or points in any CRS (GeoPackage, Shapefile, GeoJSON, FlatGeobuf); a corrected file (view --edit: a reviewed_areas layer beside its labels layer, or GeoJSON features with role reviewed_area) gets chips only inside those areas, empty ones included")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Layer of a multi-layer --labels file")] = None,
    label_field: Annotated[Optional[str], typer.Option(help="Field holding the class name (default: label or class; else one class, object)")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Class names in model order, comma-separated (others skipped)")] = None,
    point_size: Annotated[Optional[float], typer.Option(help="Box side for point labels, in the raster CRS's units (metres)")] = None,
    bounds: Annotated[Optional[str], typer.Option(help="Only cut chips inside XMIN,YMIN,XMAX,YMAX (raster CRS)")] = None,
    annotations: Annotated[Optional[Path], typer.Option(help="COCO JSON of the source images (an image's reviewed_areas, as view --edit writes them, limit its chips to those areas)")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder of the COCO JSON (default: images/ beside it)")] = None,
    visdrone: Annotated[Optional[Path], typer.Option(help="A VisDrone-DET folder (images/, annotations/) instead of COCO")] = None,
    size: Annotated[int, typer.Option(min=32, max=16384, help="Chip size in pixels (sliding windows)")] = 512,
    overlap: Annotated[Optional[int], typer.Option(parser=pixels, help="Overlap between neighbouring chips in pixels, at most half of --size, as detect's --overlap (default: a fifth of --size, 102 at 512)")] = None,
    quadrants: Annotated[bool, typer.Option(help="The paper's VisDrone split: four equal quadrants")] = False,
    min_visible: Annotated[float, typer.Option(min=0.0, max=1.0, help="Keep a clipped box if at least this fraction is visible")] = 0.5,
    keep_empty: Annotated[bool, typer.Option(help="Also write chips without objects")] = False,
    gsd: Annotated[Optional[float], typer.Option("--gsd", help="Cut chips at this ground resolution, metres per pixel (georeferenced rasters are resampled; default: their own)")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Set this share of each raster apart for validation, as one block at its east (or south) end: chips there go to val.json, none overlaps a training chip")] = 0.0,
    val_bounds: Annotated[Optional[str], typer.Option(help="Validation block XMIN,YMIN,XMAX,YMAX in the raster CRS (instead of --val-fraction)")] = None,
) -> None:
    """Cut large images or GeoTIFFs and their labels (COCO, VisDrone or a GIS layer) into training chips."""
    sources = sum(x is not None for x in (annotations, visdrone, labels))
    if sources != 1:
        raise QueryDetError("give exactly one of --labels (a GIS layer, with rasters), "
                            "--annotations (COCO JSON) or --visdrone (folder)")
    if bool(rasters) != (labels is not None):
        raise QueryDetError("rasters are given with --labels, and only with it")
    if overlap is not None and not quadrants:
        from ..pipeline.tiling import check_plan

        check_plan(size, overlap, "--size")
    box = _parse_bounds(bounds, "--bounds") if bounds is not None else None
    from ..reading.gsd import check_input_gsd

    check_input_gsd(gsd, "--gsd")
    _folder_option(out, "--out")
    if val_fraction and val_bounds:
        raise QueryDetError("give --val-fraction or --val-bounds, not both")
    val_box = _parse_bounds(val_bounds, "--val-bounds") if val_bounds else None
    class_list = list(comma_list(classes, "--classes")) if classes else None
    if classes is not None and not class_list:
        raise QueryDetError("--classes: give class names separated by commas")
    _refuse_out_holding_sources(out, [*(rasters or []), annotations, images, visdrone, labels])
    from ..training.chips import cut_chips
    from ..training.datasets import coco_category_ids, load_coco, load_visdrone
    from ..training.train import report_problems

    ids = None
    if labels is not None:
        from ..training.vector_labels import load_vector_labels

        found = load_vector_labels([str(r) for r in rasters], labels, layer=layer,
                                   label_field=label_field, classes=class_list,
                                   point_size=point_size)
        samples, names, problems = found.samples, found.class_names, found.problems
        print(f"querydet: {found.total} labels in {labels}: {found.total - found.outside} on "
              f"the rasters, {found.outside} outside every raster"
              + (f"; chips only inside its {found.reviewed} reviewed area(s)"
                 if found.reviewed else ""), file=sys.stderr)
    elif visdrone is not None:
        samples, names, problems = load_visdrone(visdrone)
    else:
        samples, names, problems = load_coco(annotations, images)
        ids = coco_category_ids(annotations)
    report_problems(problems)
    if not samples:
        raise QueryDetError("no usable source images (see the warnings above)")
    with _chip_folder(out):
        cut_chips(samples, names, out, size=size, overlap=overlap, quadrants=quadrants,
                  min_visible=min_visible, keep_empty=keep_empty, class_ids=ids,
                  bounds=box, gsd=gsd, val_fraction=val_fraction, val_bounds=val_box)
    for name in ("annotations.json", "val.json") if (val_fraction or val_box) else ("annotations.json",):
        data = json.loads((out / name).read_text())
        print(f"{len(data['images'])} chips, "
              f"{sum(1 for a in data['annotations'] if not a['iscrowd'])} boxes -> {out / name}")


@contextlib.contextmanager
def _chip_folder(out: Path) -> Iterator[None]:
    """`tile`'s output folder, held by one run at a time: a finished run leaves only its chips
    (the lock file removed), a failed one no folder it made."""
    from ..core.locking import OutputLock

    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out / ".querydet.lock", str(out)).acquire()
    try:
        yield
    finally:
        lock.release(remove=True)
        if made and not any(out.iterdir()):
            out.rmdir()
