"""The `querydet` command line: thin Typer commands over importable functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import QueryDetError

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "sample_data" / "sample_model.pt"

app = typer.Typer(
    name="querydet",
    help="Find small objects in very large aerial images with QueryDet's Cascade Sparse Query.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def bench(
    *,
    detector: Annotated[str, typer.Option(help="Detector family: retinanet, fcos or faster_rcnn (ignored with --weights)")] = "retinanet",
    backbone: Annotated[str, typer.Option(help="resnet18/34/50, mobilenet_v2, shufflenet_v2")] = "resnet50",
    image_size: Annotated[int, typer.Option(help="Square input side in pixels (long side for --image)")] = 1024,
    batch: Annotated[int, typer.Option(min=1, max=64, help="Images per batch")] = 1,
    query_density: Annotated[float, typer.Option(help="Fraction of start-level positions queried (simulated small objects); 0 = use the query head and --sigma")] = 0.03,
    sigma: Annotated[float, typer.Option(help="Query threshold")] = 0.15,
    start_level: Annotated[int, typer.Option(help="CSQ start level (Table 4)")] = 4,
    paper_context: Annotated[str, typer.Option(help="Submanifold context of the paper mode: 1x1..11x11")] = "5x5",
    backends: Annotated[str, typer.Option(help="Sparse backends to time for exact CSQ, comma-separated")] = "torch,spconv",
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per mode (median reported)")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint to bench instead of random weights")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image file to use instead of random pixels")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads")] = None,
    seed: Annotated[int, typer.Option(help="Seed for weights, input and simulated objects")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout")] = False,
) -> None:
    """Time dense-HR, CSQ (exact, paper context), CQ, CCQ and the family's baseline on one input."""
    from models.config import CONTEXTS

    from .bench import BenchOptions, format_report, run_bench
    from .engine import load_model

    if paper_context not in CONTEXTS or paper_context == "exact":
        raise QueryDetError(f"--paper-context must be one of {', '.join(CONTEXTS[1:])}")
    if not 3 <= start_level <= 6:
        raise QueryDetError(f"--start-level must be in 3..6, got {start_level}")
    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    bad = [b for b in names if b not in ("torch", "spconv")]
    if bad or not names:
        raise QueryDetError(f"--backends: unknown backend {bad[0] if bad else '(none)'} (allowed: torch, spconv)")
    model = None
    if weights is not None:
        model, ckpt_cfg = load_model(weights, device)
        backbone = ckpt_cfg.model.backbone  # the baseline gets the checkpoint's backbone
        detector = ckpt_cfg.model.detector
    from .bench import DETECTORS
    if detector not in DETECTORS:
        raise QueryDetError(f"--detector: {detector!r} is not one of {', '.join(DETECTORS)}")
    opts = BenchOptions(detector=detector, backbone=backbone, image_size=image_size, batch=batch,
                        query_density=query_density if query_density > 0 else None, sigma=sigma,
                        start_level=start_level, paper_context=paper_context, backends=names,
                        repeats=repeats, device=device, seed=seed, threads=threads)
    from models.config import BACKBONES
    if backbone not in BACKBONES:
        raise QueryDetError(f"--backbone: {backbone!r} is not one of {', '.join(BACKBONES)}")

    def progress(name: str) -> None:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)

    report = run_bench(opts, model=model, image=image, progress=progress)
    if json_out:
        print(json.dumps(report))
    else:
        print(format_report(report))


@app.command(name="bench-detect")
def bench_detect(
    *,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint (default: the bundled sample model)")] = None,
    sizes: Annotated[str, typer.Option(help="Synthetic GeoTIFF sides for the memory test, comma-separated ('' to skip)")] = "4096,16384",
    raster: Annotated[Optional[str], typer.Option(help="Raster for the CSQ vs dense throughput test")] = "sample_data/sample_scene.tif",
    workdir: Annotated[Path, typer.Option(help="Where the synthetic rasters and outputs go")] = Path("runs/bench-detect"),
    tile_size: Annotated[int, typer.Option(help="Tile side")] = 1024,
    overlap: Annotated[int, typer.Option(help="Tile overlap")] = 128,
    batch_size: Annotated[int, typer.Option(help="Tiles per batch")] = 2,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout")] = False,
) -> None:
    """Peak memory of detect on growing rasters, and CSQ vs dense megapixels per second."""
    from .bench_detect import format_report, run

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise QueryDetError(f"--sizes: expected numbers like 4096,16384, got {sizes!r}") from None
    if any(not 256 <= s <= 65536 for s in size_list):
        raise QueryDetError("--sizes: each size must be in 256..65536")
    w = str(weights or DEFAULT_WEIGHTS)
    if not Path(w).is_file():
        raise QueryDetError(f"checkpoint not found: {w}")
    report = run(size_list, w, workdir, raster or None, device, tile_size, overlap, batch_size)
    print(json.dumps(report) if json_out else format_report(report))


@app.command()
def detect(
    inputs: Annotated[list[str], typer.Argument(help="GeoTIFFs, images, folders, globs; - reads paths from stdin")],
    *,
    output: Annotated[str, typer.Option("--output", "-o", help="Output file (.geojson .gpkg .json=COCO .csv .ndjson) or - for stdout")] = "detections.geojson",
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint (default: sample_data/sample_model.pt)")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="geojson, gpkg, coco, csv or ndjson (default: from the suffix)")] = None,
    sigma: Annotated[Optional[float], typer.Option(help="Query threshold of CSQ")] = None,
    no_csq: Annotated[bool, typer.Option("--no-csq", help="Dense inference on every level")] = False,
    mode: Annotated[Optional[str], typer.Option(help="dense, csq, cq or ccq")] = None,
    context: Annotated[Optional[str], typer.Option(help="exact or 1x1..11x11 (paper submanifold)")] = None,
    backend: Annotated[Optional[str], typer.Option(help="auto, torch or spconv")] = None,
    score_threshold: Annotated[float, typer.Option(help="Drop detections scoring below this (eval uses the config's 0.05 for AP)")] = 0.3,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels")] = 1024,
    overlap: Annotated[int, typer.Option(help="Tile overlap in pixels")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Tiles per batch")] = 2,
    bands: Annotated[Optional[str], typer.Option(help="Bands to use, 1-based, e.g. 3,2,1 (default: RGB / first three)")] = None,
    merge_metric: Annotated[str, typer.Option(help="Cross-tile merge overlap: iou or ios")] = "iou",
    merge_threshold: Annotated[float, typer.Option(help="Overlap at which views from two tiles are one object")] = 0.5,
    rfc7946: Annotated[bool, typer.Option("--rfc7946", help="GeoJSON in EPSG:4326 lon/lat (RFC 7946)")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run into the same output")] = False,
    save_vis: Annotated[Optional[Path], typer.Option(help="Folder for PNG overviews with boxes and query heatmap")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
) -> None:
    """Detect small objects in huge GeoTIFFs and drone frames, tile by tile, with CSQ.

    Exit codes: 0 all inputs done; 1 some inputs failed (the rest are in the output);
    2 usage or input error, nothing written; 130 interrupted (no output; --resume continues).
    """
    import torch

    from .detect import DetectOptions, expand_inputs, run_detect
    from .engine import load_model, progress_bar
    from .writers import format_for

    out_format = format_for(output, fmt)
    if no_csq and mode not in (None, "dense"):
        raise QueryDetError("--no-csq and --mode contradict each other")
    if mode is not None and mode not in ("dense", "csq", "cq", "ccq"):
        raise QueryDetError(f"--mode: {mode!r} is not one of dense, csq, cq, ccq")
    if merge_metric not in ("iou", "ios"):
        raise QueryDetError(f"--merge-metric: {merge_metric!r} is not one of iou, ios")
    if sigma is not None and not 0 <= sigma <= 1:
        raise QueryDetError(f"--sigma must be in [0, 1], got {sigma}")
    band_list = None
    if bands:
        try:
            band_list = tuple(int(b) for b in bands.split(","))
        except ValueError:
            raise QueryDetError(f"--bands: expected band numbers like 3,2,1, got {bands!r}") from None
    paths = expand_inputs(inputs)
    model, cfg = load_model(weights or DEFAULT_WEIGHTS, device)
    opts = DetectOptions(tile_size=tile_size, overlap=overlap, batch_size=batch_size,
                         mode="dense" if no_csq else mode, sigma=sigma, context=context,
                         backend=backend, score_threshold=score_threshold, bands=band_list,
                         merge_metric=merge_metric, merge_threshold=merge_threshold,
                         rfc7946=rfc7946, resume=resume,
                         save_vis=str(save_vis) if save_vis else None)
    summary = run_detect(model, cfg, paths, output, out_format, opts, torch.device(device),
                         progress_factory=None if quiet else progress_bar)
    rate = summary.megapixels / summary.seconds if summary.seconds > 0 else 0.0
    print(f"querydet: {summary.done}/{summary.inputs} inputs, {summary.detections} detections, "
          f"{summary.megapixels:.1f} Mpx at {rate:.2f} Mpx/s"
          + (f" -> {output}" if output != "-" else ""), file=sys.stderr)
    if summary.failed:
        for path, why in summary.failed:
            print(f"querydet: failed: {path}: {why}", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
def train(
    *,
    config: Annotated[str, typer.Option(help="Config name in configs/ or a YAML path")] = "querydet_mobilenet_synthetic",
    out: Annotated[Path, typer.Option(help="Output folder: last.pt, model_final.pt, metrics.jsonl")] = Path("runs/train"),
    dataset: Annotated[Optional[str], typer.Option(help="synthetic, coco or visdrone (overrides data.dataset)")] = None,
    train_root: Annotated[Optional[str], typer.Option(help="VisDrone folder, or COCO image folder")] = None,
    train_annotations: Annotated[Optional[str], typer.Option(help="COCO JSON of the training set")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt on the same schedule")] = False,
    max_iter: Annotated[Optional[int], typer.Option(help="Override train.max_iter")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Override train.batch_size")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Override train.base_lr")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Override train.workers")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override train.seed")] = None,
) -> None:
    """Train QueryDet (RetinaNet, FCOS or Faster R-CNN host, from the config) or a baseline (multi-GPU: torchrun --nproc_per_node N -m querydet_cli train ...)."""
    from .config import load_config, with_changes
    from .training import train as run_training

    cfg = load_config(config)
    if dataset is not None and dataset not in ("synthetic", "coco", "visdrone"):
        raise QueryDetError(f"--dataset: {dataset!r} is not one of synthetic, coco, visdrone")
    cfg = with_changes(cfg, "data", dataset=dataset, train_root=train_root,
                       train_annotations=train_annotations)
    cfg = with_changes(cfg, "train", max_iter=max_iter, batch_size=batch_size, base_lr=lr,
                       workers=workers, seed=seed)
    summary = run_training(cfg, out, device=device, resume=resume)
    print(json.dumps(summary))


@app.command(name="eval")
def evaluate(
    *,
    weights: Annotated[Path, typer.Option(help="Checkpoint (its embedded config is used)")],
    protocol: Annotated[str, typer.Option(help="coco or visdrone")] = "coco",
    sigma: Annotated[str, typer.Option(help="Query thresholds to sweep, comma-separated")] = "0.05,0.1,0.15,0.2,0.3",
    config: Annotated[Optional[str], typer.Option(help="Take data.* from this config instead of the checkpoint's")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="synthetic, coco or visdrone")] = None,
    val_root: Annotated[Optional[str], typer.Option(help="VisDrone folder, or COCO image folder")] = None,
    val_annotations: Annotated[Optional[str], typer.Option(help="COCO JSON of the evaluation set")] = None,
    max_dets: Annotated[Optional[int], typer.Option(help="COCO maxDets (default 100)")] = None,
    out: Annotated[Path, typer.Option(help="Folder for report.json, tradeoff.png, visualisations")] = Path("runs/eval"),
    save_vis: Annotated[bool, typer.Option(help="Write a few images with detections and query heatmaps")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
) -> None:
    """Evaluate a checkpoint (COCO or VisDrone protocol), dense and CSQ over a sigma sweep."""
    import torch

    from .config import load_config, with_changes
    from .engine import load_model
    from .evaluation import evaluate as run_eval
    from .evaluation import format_table, plot_tradeoff, save_visualisations
    from .training import load_split, report_problems

    if protocol not in ("coco", "visdrone"):
        raise QueryDetError(f"--protocol: {protocol!r} is not one of coco, visdrone")
    try:
        sigmas = [float(v) for v in sigma.split(",") if v.strip()]
    except ValueError:
        raise QueryDetError(f"--sigma: expected numbers separated by commas, got {sigma!r}") from None
    if not sigmas or any(not 0 <= s <= 1 or s != s for s in sigmas):
        raise QueryDetError(f"--sigma: every value must be in [0, 1], got {sigma!r}")
    model, cfg = load_model(weights, device)
    if config is not None:
        from dataclasses import replace

        cfg = replace(cfg, data=load_config(config).data)
    cfg = with_changes(cfg, "data", dataset=dataset, val_root=val_root,
                       val_annotations=val_annotations)
    out.mkdir(parents=True, exist_ok=True)
    samples, _, problems = load_split(cfg, "val", out)
    report_problems(problems)
    if not samples:
        raise QueryDetError("no usable evaluation images (see the warnings above)")
    dev = torch.device(device)
    report = run_eval(model, cfg, samples, protocol=protocol, sigmas=sigmas, device=dev,
                      max_dets=max_dets)
    from models.checkpoint import save_json_atomic

    save_json_atomic(out / "report.json", report)
    plot_tradeoff(report, out / "tradeoff.png")
    if save_vis:
        save_visualisations(model, cfg, samples, out / "vis", dev, sigmas[len(sigmas) // 2])
    if json_out:
        print(json.dumps(report))
    else:
        print(format_table(report))
        print(f"wrote {out / 'report.json'} and {out / 'tradeoff.png'}", file=sys.stderr)


@app.command()
def tile(
    *,
    out: Annotated[Path, typer.Option(help="Output folder: images/ and annotations.json (COCO)")],
    annotations: Annotated[Optional[Path], typer.Option(help="COCO JSON of the source images")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder of the COCO JSON (default: images/ beside it)")] = None,
    visdrone: Annotated[Optional[Path], typer.Option(help="A VisDrone-DET folder (images/, annotations/) instead of COCO")] = None,
    size: Annotated[int, typer.Option(help="Chip size in pixels (sliding windows)")] = 512,
    overlap: Annotated[float, typer.Option(help="Overlap between neighbouring chips, fraction of size")] = 0.2,
    quadrants: Annotated[bool, typer.Option(help="The paper's VisDrone split: four equal quadrants")] = False,
    min_visible: Annotated[float, typer.Option(help="Keep a clipped box if at least this fraction is visible")] = 0.5,
    keep_empty: Annotated[bool, typer.Option(help="Also write chips without objects")] = False,
) -> None:
    """Cut large images or GeoTIFFs and their annotations into training chips."""
    from .chips import cut_chips
    from .datasets import load_coco, load_visdrone
    from .training import report_problems

    if (annotations is None) == (visdrone is None):
        raise QueryDetError("give exactly one of --annotations (COCO JSON) or --visdrone (folder)")
    if visdrone is not None:
        samples, names, problems = load_visdrone(visdrone)
    else:
        samples, names, problems = load_coco(annotations, images)
    report_problems(problems)
    if not samples:
        raise QueryDetError("no usable source images (see the warnings above)")
    path = cut_chips(samples, names, out, size=size, overlap=overlap, quadrants=quadrants,
                     min_visible=min_visible, keep_empty=keep_empty)
    data = json.loads(path.read_text())
    print(f"{len(data['images'])} chips, {sum(1 for a in data['annotations'] if not a['iscrowd'])} "
          f"boxes -> {path}")


def main() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit code 2."""
    from models.backbones import BackboneWeightsError
    from models.checkpoint import CheckpointError
    from models.config import ConfigError
    from models.querydet import ModelInputError

    try:
        app()
    except QueryDetError as err:
        print(f"querydet: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (ModelInputError, ConfigError, CheckpointError, BackboneWeightsError) as err:
        print(f"querydet: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("querydet: interrupted", file=sys.stderr)
        sys.exit(130)
