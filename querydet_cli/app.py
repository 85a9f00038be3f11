"""The `querydet` command line: thin Typer commands over importable functions.

Nothing here imports torch at module level: `querydet --help`, `--version` and `configs` answer
without loading it. Each command imports what it needs when it runs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, get_args, get_type_hints

import typer

from querydet_models.config import BACKBONES, CONTEXTS, InferenceConfig, ModelConfig

from .config import DataConfig
from .errors import QueryDetError
from .writers import FORMATS

log = logging.getLogger("querydet")


def _choices(name: str, values) -> type[Enum]:
    """A str Enum of `values`, so help and shell completion list them (Typer choice option)."""
    return Enum(name, {v: v for v in values}, type=str)


class Recipe(str, Enum):
    finetune = "finetune"
    config = "config"


def _literal(cls: type, field: str) -> tuple[str, ...]:
    """The allowed values of a config field typed `Literal[...]` (the config is the source)."""
    return get_args(get_type_hints(cls)[field])


# every list below is defined once elsewhere, in modules that do not import torch
Device = _choices("Device", ("auto", "cpu", "cuda"))  # auto: CUDA when available
Mode = _choices("Mode", _literal(InferenceConfig, "mode"))
Backend = _choices("Backend", _literal(InferenceConfig, "backend"))
Precision = _choices("Precision", _literal(InferenceConfig, "precision"))
Detector = _choices("Detector", _literal(ModelConfig, "detector"))
Backbone = _choices("Backbone", BACKBONES)
Dataset = _choices("Dataset", _literal(DataConfig, "dataset"))
OutputFormat = _choices("OutputFormat", FORMATS)
MergeMetric = _choices("MergeMetric", ("iou", "ios"))
Protocol = _choices("Protocol", ("coco", "visdrone"))


def _context(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in CONTEXTS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(CONTEXTS)}")
    return value


def _precision_list(value: str) -> tuple[str, ...]:
    """--precision of the bench commands: one or more precisions, comma-separated."""
    precisions = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in precisions if p not in Precision.__members__]
    if bad or not precisions:
        raise QueryDetError(f"--precision: {bad[0] if bad else '(none)'!r} is not one of "
                            f"{', '.join(Precision.__members__)}")
    return precisions


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"querydet {version('querydet')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print("querydet (not installed)")
        raise typer.Exit()


app = typer.Typer(
    name="querydet",
    help="Find small objects in very large aerial images with QueryDet's Cascade Sparse Query.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    *,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Log to stderr (-v info, -vv debug)")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")] = False,
) -> None:
    """Find small objects in very large aerial images with QueryDet's Cascade Sparse Query."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="querydet: %(levelname)s: %(message)s", stream=sys.stderr,
                        force=True)


@app.command()
def configs() -> None:
    """List the bundled configs: name, family, backbone, dataset, head levels, CSQ."""
    from .config import load_config
    from .resources import config_names

    for name in config_names():
        cfg = load_config(name)
        m = cfg.model
        levels = f"P{min(m.levels)}-P{max(m.levels)}"
        csq = f"CSQ from P{cfg.inference.start_level}" if m.query_levels else "no query head"
        print(f"{name:40s} {m.detector:12s} {m.backbone:14s} {cfg.data.dataset:10s} {levels:7s} {csq}")


@app.command(name="bench-gsd")
def bench_gsd(
    *,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint (default: the bundled sample model)")] = None,
    size: Annotated[int, typer.Option(min=256, max=8192, help="Side of the native 0.3 m scene in pixels")] = 2048,
    seed: Annotated[int, typer.Option(help="Generator seed of the scene")] = 11,
    rounds: Annotated[int, typer.Option(min=1, max=20, help="Timings per row (median)")] = 1,
    workdir: Annotated[Optional[Path], typer.Option(help="Folder for the rasters (default: a temporary one)")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    json_out: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout")] = False,
) -> None:
    """One scene at 0.15, 0.3 and 0.6 m: AP and time read at the model's GSD against the raster's own pixels."""
    import tempfile

    from .bench_gsd import format_report, run

    with tempfile.TemporaryDirectory() as tmp:
        report = run(str(weights) if weights else None, workdir or Path(tmp), size, seed, rounds,
                     device.value)
    print(json.dumps(report) if json_out else format_report(report))


@app.command()
def info(
    weights: Annotated[Optional[Path], typer.Argument(help="Checkpoint (default: the bundled sample model)")] = None,
    *,
    json_out: Annotated[bool, typer.Option("--json", help="Everything as JSON, the full config included")] = False,
) -> None:
    """What a model is: its classes, the ground resolution (GSD) it was trained at, its config and training data."""
    from .engine import format_model_info, model_info
    from .resources import sample_model

    found = model_info(weights or sample_model())
    print(json.dumps(found) if json_out else format_model_info(found))


@app.command()
def bench(
    *,
    detector: Annotated[Detector, typer.Option(help="Detector family (ignored with --weights)")] = Detector.retinanet,
    backbone: Annotated[Backbone, typer.Option(help="Backbone (ignored with --weights)")] = Backbone.resnet50,
    image_size: Annotated[int, typer.Option(min=32, max=8192, help="Square input side in pixels (long side for --image)")] = 1024,
    batch: Annotated[int, typer.Option(min=1, max=64, help="Images per batch")] = 1,
    query_density: Annotated[float, typer.Option(help="Fraction of start-level positions queried (simulated small objects); 0 = use the query head and --sigma")] = 0.03,
    sigma: Annotated[float, typer.Option(min=0.0, max=1.0, help="Query threshold")] = 0.15,
    start_level: Annotated[int, typer.Option(min=3, max=6, help="CSQ start level (Table 4)")] = 4,
    paper_context: Annotated[str, typer.Option(help="Submanifold context of the paper mode: 1x1..11x11")] = "5x5",
    backends: Annotated[str, typer.Option(help="Sparse backends to time for exact CSQ, comma-separated: torch, spconv")] = "torch,spconv",
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per mode (median reported)")] = 3,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint to bench instead of random weights")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image file to use instead of random pixels")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads")] = None,
    precision: Annotated[str, typer.Option(help="Precisions to time, comma-separated: auto, fp32, bf16, fp16 (one set of rows each)")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for weights, input and simulated objects")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout")] = False,
) -> None:
    """Time dense-HR, CSQ (exact, paper context), CQ, CCQ and the family's baseline on one input."""
    if paper_context not in CONTEXTS or paper_context == "exact":
        raise QueryDetError(f"--paper-context must be one of {', '.join(CONTEXTS[1:])}")
    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    bad = [b for b in names if b not in ("torch", "spconv")]
    if bad or not names:
        raise QueryDetError(f"--backends: unknown backend {bad[0] if bad else '(none)'} (allowed: torch, spconv)")
    precisions = _precision_list(precision)
    from .bench import BenchOptions, format_report, run_bench
    from .engine import load_model, resolve_device

    dev = resolve_device(device.value)
    model = None
    detector_name, backbone_name = detector.value, backbone.value
    if weights is not None:
        model, ckpt_cfg = load_model(weights, dev)
        backbone_name = ckpt_cfg.model.backbone  # the baseline gets the checkpoint's backbone
        detector_name = ckpt_cfg.model.detector
    opts = BenchOptions(detector=detector_name, backbone=backbone_name, image_size=image_size,
                        batch=batch, query_density=query_density if query_density > 0 else None,
                        sigma=sigma, start_level=start_level, paper_context=paper_context,
                        backends=names, repeats=repeats, device=str(dev), seed=seed,
                        threads=threads, precisions=precisions)

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
    raster: Annotated[Optional[str], typer.Option(help="Raster for the CSQ vs dense throughput test (default: the bundled sample scene; '' to skip)")] = None,
    workdir: Annotated[Path, typer.Option(help="Where the synthetic rasters and outputs go")] = Path("runs/bench-detect"),
    tile_size: Annotated[int, typer.Option(min=64, max=8192, help="Tile side")] = 1024,
    overlap: Annotated[int, typer.Option(min=0, help="Tile overlap")] = 128,
    batch_size: Annotated[Optional[int], typer.Option(min=1, max=256, help="Tiles per batch (default: 1 on the CPU, 4 on CUDA)")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    precision: Annotated[str, typer.Option(help="Precisions for the throughput rows, comma-separated (the first is the reference)")] = "fp32,auto",
    peer: Annotated[Optional[str], typer.Option(help="sahi: the same raster and weights through SAHI, in the same run (pip install 'querydet[bench]')")] = None,
    truth: Annotated[Optional[Path], typer.Option(help="COCO ground truth of --raster, for AP in the --peer rows")] = None,
    rounds: Annotated[int, typer.Option(min=1, max=20, help="Interleaved rounds of the --peer / --ray-rasters comparisons (median)")] = 3,
    scene: Annotated[Optional[str], typer.Option(help="Instead of --raster: a synthetic busy (objects everywhere) or survey (objects in a tenth, nodata collar) GeoTIFF with its ground truth, written to --workdir")] = None,
    scene_size: Annotated[int, typer.Option(min=512, max=65536, help="Side of the --scene raster")] = 4096,
    ray_rasters: Annotated[int, typer.Option(min=0, max=1000, help="Ray scaling: detect on this many synthetic rasters with 1 and 2 single-thread actors")] = 0,
    ray_size: Annotated[int, typer.Option(min=256, max=16384, help="Side of the --ray-rasters rasters")] = 2048,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout")] = False,
) -> None:
    """Peak memory of detect on growing rasters, and CSQ vs dense megapixels per second."""
    from .resources import sample_model, sample_scene

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise QueryDetError(f"--sizes: expected numbers like 4096,16384, got {sizes!r}") from None
    if any(not 256 <= s <= 65536 for s in size_list):
        raise QueryDetError("--sizes: each size must be in 256..65536")
    if overlap >= tile_size:
        raise QueryDetError(f"--overlap ({overlap}) must be smaller than --tile-size ({tile_size})")
    if scene not in (None, "busy", "survey"):
        raise QueryDetError(f"--scene: {scene!r} is not one of busy, survey")
    if scene is not None:
        if raster is not None or truth is not None:
            raise QueryDetError("--scene makes its own raster and truth: not with --raster/--truth")
        from .bench_detect import write_big_raster, write_survey_raster

        workdir.mkdir(parents=True, exist_ok=True)
        raster = str(workdir / f"{scene}_{scene_size}.tif")
        truth = workdir / f"{scene}_{scene_size}.json"
        if not (Path(raster).is_file() and truth.is_file()):
            print(f"bench-detect: writing {raster} ...", file=sys.stderr, flush=True)
            if scene == "busy":
                write_big_raster(Path(raster), scene_size, truth=truth)
            else:
                write_survey_raster(Path(raster), scene_size, truth)
    raster_path = str(sample_scene()) if raster is None else raster
    if raster_path and not Path(raster_path).is_file():
        raise QueryDetError(f"--raster: file not found: {raster_path}")
    if not size_list and not raster_path:
        raise QueryDetError("nothing to measure: --sizes is empty and --raster is ''")
    precisions = _precision_list(precision)
    w = str(weights or sample_model())
    if not Path(w).is_file():
        raise QueryDetError(f"checkpoint not found: {w}")
    from .bench_detect import format_report, run
    from .engine import resolve_device

    dev = str(resolve_device(device.value))
    if peer not in (None, "sahi"):
        raise QueryDetError(f"--peer: {peer!r} is not one of sahi")
    if peer and not raster_path:
        raise QueryDetError("--peer compares on --raster: give one")
    if truth is not None and not truth.is_file():
        raise QueryDetError(f"--truth: file not found: {truth}")
    if ray_rasters:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise QueryDetError("--ray-rasters needs Ray: pip install 'querydet[ray]'")
    if peer:
        from .peer import _sahi_base

        _sahi_base()  # says how to install SAHI when it is missing
    report = run(size_list, w, workdir, raster_path or None, dev, tile_size, overlap, batch_size,
                 precisions, peer=peer, truth=truth, rounds=rounds, ray_rasters=ray_rasters,
                 ray_size=ray_size)
    print(json.dumps(report) if json_out else format_report(report))


@app.command()
def detect(
    inputs: Annotated[list[str], typer.Argument(help="GeoTIFFs, images, folders, globs; - reads paths from stdin")],
    *,
    output: Annotated[str, typer.Option("--output", "-o", help="Output file (.geojson .gpkg .json=COCO .csv .ndjson) or - for stdout")] = "detections.geojson",
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint (default: the bundled sample model)")] = None,
    fmt: Annotated[Optional[OutputFormat], typer.Option("--format", help="Output format (default: from the suffix)")] = None,
    sigma: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Query threshold of CSQ")] = None,
    no_csq: Annotated[bool, typer.Option("--no-csq", help="Dense inference on every level")] = False,
    mode: Annotated[Optional[Mode], typer.Option(help="Inference mode (default: the checkpoint's)")] = None,
    context: Annotated[Optional[str], typer.Option(callback=_context, help="exact or 1x1..11x11 (paper submanifold)")] = None,
    backend: Annotated[Optional[Backend], typer.Option(help="Sparse backend (default: the checkpoint's)")] = None,
    score_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Drop detections scoring below this (eval uses the config's 0.05 for AP)")] = 0.3,
    tile_size: Annotated[int, typer.Option(min=64, max=8192, help="Tile side in pixels")] = 1024,
    overlap: Annotated[int, typer.Option(min=0, help="Tile overlap in pixels")] = 128,
    batch_size: Annotated[Optional[int], typer.Option(min=1, max=256, help="Tiles per batch (default: 1 on the CPU, 4 on CUDA)")] = None,
    bands: Annotated[Optional[str], typer.Option(help="Bands to use, 1-based, e.g. 3,2,1 (default: RGB / first three)")] = None,
    merge_metric: Annotated[MergeMetric, typer.Option(help="Overlap measure of duplicate views: ios (intersection over the smaller box; also drops a tile's nested duplicates) or iou (views across tiles only)")] = MergeMetric.ios,
    merge_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Overlap at which two views are one object")] = 0.5,
    rfc7946: Annotated[bool, typer.Option("--rfc7946", help="GeoJSON in EPSG:4326 lon/lat (RFC 7946)")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run into the same output")] = False,
    save_vis: Annotated[Optional[Path], typer.Option(help="Folder for PNG overviews with boxes and query heatmap")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    precision: Annotated[Optional[Precision], typer.Option(help="Inference precision (default: the checkpoint's, auto)")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
    coco_gt: Annotated[Optional[Path], typer.Option(help="COCO ground truth: COCO results take its image ids, matched by file name")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="Print seconds per pipeline stage on stderr (also with -v; always in --json)")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Run the model on Ray: auto (a running cluster, else a local one) or ADDRESS (host:port); pip install 'querydet[ray]'")] = None,
    workers: Annotated[int, typer.Option(min=1, max=4096, help="Ray actors, each holding the model once")] = 2,
    gpus_per_worker: Annotated[float, typer.Option(min=0.0, max=16.0, help="GPUs per Ray actor (0: CPU actors)")] = 0.0,
    threads_per_worker: Annotated[int, typer.Option(min=1, max=256, help="torch threads (and Ray CPUs) per actor")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (not with -o -)")] = False,
    gsd: Annotated[str, typer.Option("--gsd", help="Ground resolution to read rasters at: auto (the model's training GSD), native (the raster's own pixels) or metres per pixel")] = "auto",
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: each tile in its eight dihedral views (8x the compute), the answers voted into one")] = False,
    input_gsd: Annotated[Optional[float], typer.Option("--input-gsd", help="Metres per pixel of inputs without a georeference (drone frames, plain images); overrides a georeference")] = None,
) -> None:
    """Detect small objects in huge GeoTIFFs and drone frames, tile by tile, with CSQ.

    Exit codes: 0 all inputs done; 1 some inputs failed (the rest are in the output);
    2 usage or input error, nothing written; 130 interrupted (no output; --resume continues).
    """
    from .writers import format_for

    out_format = format_for(output, fmt.value if fmt else None)
    if ray is None and (workers != 2 or gpus_per_worker or threads_per_worker != 1):
        raise QueryDetError("--workers, --gpus-per-worker and --threads-per-worker go with --ray")
    if ray is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise QueryDetError("--ray needs Ray: pip install 'querydet[ray]'")
    if json_out and output == "-":
        raise QueryDetError("--json prints a summary on stdout, where -o - writes detections: "
                            "choose one")
    if no_csq and mode not in (None, Mode.dense):
        raise QueryDetError("--no-csq and --mode contradict each other")
    if overlap > tile_size // 2:
        raise QueryDetError(f"--overlap ({overlap}) must be at most half of --tile-size "
                            f"({tile_size})")
    band_list = None
    if bands:
        try:
            band_list = tuple(int(b) for b in bands.split(","))
        except ValueError:
            raise QueryDetError(f"--bands: expected band numbers like 3,2,1, got {bands!r}") from None
        if len(band_list) not in (1, 3) or any(b < 1 for b in band_list):
            raise QueryDetError(f"--bands: one band (grey) or three (R,G,B), numbered from 1; "
                                f"got {bands!r}")
    if resume and output == "-":
        raise QueryDetError("--resume needs an output file, not stdout")
    if save_vis is not None:
        _folder_option(save_vis, "--save-vis")
    from .gsd import check_input_gsd, parse_gsd_option

    gsd_option = parse_gsd_option(gsd)
    input_gsd = check_input_gsd(input_gsd)
    import contextlib

    from .locking import claim_output

    # one writer per output: the lock is taken before torch loads, so a second run is refused
    # at once
    from .inputs import expand_inputs, refuse_output_over_inputs

    paths = expand_inputs(inputs)
    refuse_output_over_inputs(output, paths)
    if output != "-" and Path(output).is_dir():
        raise QueryDetError(f"output {output} is a directory; give a file name")
    with claim_output(output) if output != "-" else contextlib.nullcontext() as lock:
        from .detect import DetectInterrupted, DetectOptions, run_detect
        from .engine import load_model, progress_bar, resolve_device
        from .resources import sample_model

        image_ids = None
        if coco_gt is not None:
            from .identity import coco_image_ids

            image_ids = coco_image_ids(coco_gt, paths)
        dev = resolve_device(device.value)
        model, cfg = load_model(weights or sample_model(), dev)
        opts = DetectOptions(tile_size=tile_size, overlap=overlap, batch_size=batch_size,
                             mode="dense" if no_csq else (mode.value if mode else None),
                             sigma=sigma, context=context,
                             backend=backend.value if backend else None,
                             score_threshold=score_threshold, bands=band_list,
                             merge_metric=merge_metric.value, merge_threshold=merge_threshold,
                             rfc7946=rfc7946, resume=resume,
                             save_vis=str(save_vis) if save_vis else None,
                             precision=precision.value if precision else None,
                             image_ids=image_ids, profile=profile, gsd=gsd_option,
                             input_gsd=input_gsd, tta=tta)
        try:
            settings = None
            if ray is not None:
                from .distributed import RaySettings

                settings = RaySettings(address=ray, workers=workers,
                                       gpus_per_worker=gpus_per_worker,
                                       threads_per_worker=threads_per_worker)
            summary = run_detect(model, cfg, paths, output, out_format, opts, dev,
                                 progress_factory=None if quiet else progress_bar, lock=lock,
                                 ray=settings, weights=weights or sample_model())
        except DetectInterrupted as err:
            if err.resumable:
                import shlex

                args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
                raise QueryDetError(f"{err}; continue with: {shlex.join(['querydet', *args])}",
                                    exit_code=130) from None
            raise
    rate = summary.megapixels / summary.seconds if summary.seconds > 0 else 0.0
    found = f"{summary.detections} detections"
    if summary.resumed_detections:
        found += (f" ({summary.resumed_detections} from the interrupted run's journal, "
                  f"{summary.new_detections} from this run)")
    where = f" -> {output}" if summary.output_written else ""
    if output != "-" and not summary.output_written:
        where = f" ({output} not written: no input succeeded)"
    print(f"querydet: {summary.done}/{summary.inputs} inputs, {found}, "
          f"{summary.megapixels:.1f} Mpx at {rate:.2f} Mpx/s{where}", file=sys.stderr)
    if summary.profile and (profile or log.isEnabledFor(logging.INFO)):
        from .profile import format_profile

        print(format_profile(summary.profile), file=sys.stderr)
    if json_out:
        print(json.dumps({"inputs": summary.inputs, "done": summary.done,
                          "failed": [{"input": p, "error": e} for p, e in summary.failed],
                          "detections": summary.detections,
                          "resumed_detections": summary.resumed_detections,
                          "new_detections": summary.new_detections,
                          "megapixels": round(summary.megapixels, 3),
                          "seconds": round(summary.seconds, 3),
                          "output": output if summary.output_written else None,
                          "precision": getattr(summary, "precision", None),
                          "profile": summary.profile}))
    if summary.failed:  # each error was printed once, when it happened
        print(f"querydet: {len(summary.failed)} input(s) failed (errors above)", file=sys.stderr)
        # no input succeeded: an input error, nothing written (exit 2); else a partial run (1)
        raise typer.Exit(2 if summary.done == 0 else 1)


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
    recipe: Annotated[Optional[Recipe], typer.Option(help="finetune (the default with --init): epochs, warm-up, backbone at 0.1x, frozen BN, native scale, augmentation; config: the config's own schedule")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, max=100000, help="Override train.epochs (passes over the training set)")] = None,
    val_annotations: Annotated[Optional[str], typer.Option(help="COCO JSON of validation chips (e.g. tile's val.json): AP every --eval-period iterations, model_best.pt")] = None,
    val_root: Annotated[Optional[str], typer.Option(help="Image folder of --val-annotations (default: images/ beside it)")] = None,
    eval_period: Annotated[Optional[int], typer.Option(min=0, help="Override train.eval_period (iterations between validations; 0: none)")] = None,
    early_stop: Annotated[Optional[int], typer.Option(min=0, help="Override train.early_stop (validations without a better AP before stopping; 0: never)")] = None,
) -> None:
    """Train QueryDet (RetinaNet, FCOS or Faster R-CNN host, from the config) or a baseline (multi-GPU: torchrun --nproc_per_node N -m querydet_cli train ...)."""
    from .config import config_from_dict, load_config, with_changes

    _folder_option(out, "--out")
    if config is None and init is not None:  # fine-tune: the checkpoint's model and schedule
        from querydet_models.checkpoint import load_checkpoint

        cfg = config_from_dict(load_checkpoint(init)["config"])
    else:
        cfg = load_config(config or "querydet_mobilenet_synthetic")
    if freeze_backbone:
        cfg = with_changes(cfg, "train", freeze_backbone=True)
    if freeze_bn:
        cfg = with_changes(cfg, "train", freeze_bn=True)
    from .gsd import check_input_gsd

    check_input_gsd(gsd, "--gsd")
    if dataset is not None or train_root is not None or train_annotations is not None:
        # other training data: the GSD comes from it (or --gsd), not from --init's checkpoint
        from dataclasses import replace

        cfg = replace(cfg, data=replace(cfg.data, gsd=None))
    cfg = with_changes(cfg, "data", dataset=dataset.value if dataset else None,
                       train_root=train_root, train_annotations=train_annotations, gsd=gsd)
    if val_annotations is not None:
        cfg = with_changes(cfg, "data", val_annotations=val_annotations, val_root=val_root)
    if (recipe or (Recipe.finetune if init is not None else Recipe.config)) == Recipe.finetune:
        from .training import finetune_recipe

        cfg = finetune_recipe(cfg, validation=val_annotations is not None)
    if max_iter is not None and epochs is None:  # a count of iterations replaces the epochs
        cfg = with_changes(cfg, "train", epochs=0)
    cfg = with_changes(cfg, "train", max_iter=max_iter, batch_size=batch_size, base_lr=lr,
                       workers=workers, seed=seed, epochs=epochs, eval_period=eval_period,
                       early_stop=early_stop)
    from .engine import resolve_device
    from .training import train as run_training

    dev = resolve_device(device.value)
    summary = run_training(cfg, out, device=str(dev), resume=resume, init=init)
    print(json.dumps(summary))


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
    save_vis: Annotated[bool, typer.Option(help="Write a few images with detections and query heatmaps")] = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    precision: Annotated[Optional[Precision], typer.Option(help="Inference precision (default: the checkpoint's, auto)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
) -> None:
    """Evaluate a checkpoint (COCO or VisDrone protocol), dense and CSQ over a sigma sweep."""
    try:
        sigmas = [float(v) for v in sigma.split(",") if v.strip()]
    except ValueError:
        raise QueryDetError(f"--sigma: expected numbers separated by commas, got {sigma!r}") from None
    if not sigmas or any(not 0 <= s <= 1 or s != s for s in sigmas):
        raise QueryDetError(f"--sigma: every value must be in [0, 1], got {sigma!r}")
    _folder_option(out, "--out")
    from .config import load_config, with_changes
    from .engine import load_model, resolve_device
    from .evaluation import evaluate as run_eval
    from .evaluation import format_table, plot_tradeoff, save_visualisations
    from .training import load_split, report_problems

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
    labels: Annotated[Optional[Path], typer.Option(help="GIS layer of boxes, polygons or points in any CRS (GeoPackage, Shapefile, GeoJSON, FlatGeobuf)")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Layer of a multi-layer --labels file")] = None,
    label_field: Annotated[Optional[str], typer.Option(help="Field holding the class name (default: label or class; else one class, object)")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Class names in model order, comma-separated (others skipped)")] = None,
    point_size: Annotated[Optional[float], typer.Option(help="Box side for point labels, in the raster CRS's units (metres)")] = None,
    bounds: Annotated[Optional[str], typer.Option(help="Only cut chips inside XMIN,YMIN,XMAX,YMAX (raster CRS)")] = None,
    annotations: Annotated[Optional[Path], typer.Option(help="COCO JSON of the source images")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder of the COCO JSON (default: images/ beside it)")] = None,
    visdrone: Annotated[Optional[Path], typer.Option(help="A VisDrone-DET folder (images/, annotations/) instead of COCO")] = None,
    size: Annotated[int, typer.Option(min=32, max=16384, help="Chip size in pixels (sliding windows)")] = 512,
    overlap: Annotated[float, typer.Option(min=0.0, max=0.95, help="Overlap between neighbouring chips, fraction of size")] = 0.2,
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
    box = _parse_bounds(bounds, "--bounds") if bounds is not None else None
    from .gsd import check_input_gsd

    check_input_gsd(gsd, "--gsd")
    _folder_option(out, "--out")
    if val_fraction and val_bounds:
        raise QueryDetError("give --val-fraction or --val-bounds, not both")
    val_box = _parse_bounds(val_bounds, "--val-bounds") if val_bounds else None
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if classes is not None and not class_list:
        raise QueryDetError("--classes: give class names separated by commas")
    _refuse_out_holding_sources(out, [*(rasters or []), annotations, images, visdrone, labels])
    from .chips import cut_chips
    from .datasets import coco_category_ids, load_coco, load_visdrone
    from .training import report_problems

    ids = None
    if labels is not None:
        from .vector_labels import load_vector_labels

        found = load_vector_labels([str(r) for r in rasters], labels, layer=layer,
                                   label_field=label_field, classes=class_list,
                                   point_size=point_size)
        samples, names, problems = found.samples, found.class_names, found.problems
        print(f"querydet: {found.total} labels in {labels}: {found.total - found.outside} on "
              f"the rasters, {found.outside} outside every raster", file=sys.stderr)
    elif visdrone is not None:
        samples, names, problems = load_visdrone(visdrone)
    else:
        samples, names, problems = load_coco(annotations, images)
        ids = coco_category_ids(annotations)
    report_problems(problems)
    if not samples:
        raise QueryDetError("no usable source images (see the warnings above)")
    from .locking import OutputLock

    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out / ".querydet.lock", str(out)):  # one run per folder
        cut_chips(samples, names, out, size=size, overlap=overlap, quadrants=quadrants,
                         min_visible=min_visible, keep_empty=keep_empty, class_ids=ids,
                         bounds=box, gsd=gsd, val_fraction=val_fraction, val_bounds=val_box)
    for name in ("annotations.json", "val.json") if (val_fraction or val_box) else ("annotations.json",):
        data = json.loads((out / name).read_text())
        print(f"{len(data['images'])} chips, "
              f"{sum(1 for a in data['annotations'] if not a['iscrowd'])} boxes -> {out / name}")


def _folder_option(path: Path, option: str) -> None:
    """An output folder option that names an existing file is a usage error, found first."""
    if path.exists() and not path.is_dir():
        raise QueryDetError(f"{option} {path} is a file, not a folder")


def _parse_bounds(text: str, option: str) -> tuple[float, float, float, float]:
    """XMIN,YMIN,XMAX,YMAX with XMIN < XMAX and YMIN < YMAX."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or \
            not (box[0] < box[2] and box[1] < box[3]):
        raise QueryDetError(f"{option}: expected XMIN,YMIN,XMAX,YMAX with XMIN < XMAX and "
                            f"YMIN < YMAX, got {text!r}")
    return box


def _refuse_out_holding_sources(out: Path, sources: list[Optional[Path]]) -> None:
    """`tile --out` must not be where the sources are: chips would overwrite them."""
    target = out.resolve()
    for src in sources:
        if src is None:
            continue
        s = Path(src).resolve()
        folder = s if s.is_dir() else s.parent
        if folder == target or target in s.parents:
            raise QueryDetError(f"--out {out} holds the source {src}: its images/ and "
                                "annotations.json would overwrite them; choose another folder")


def main() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit code 2."""
    try:  # typer >= 0.2x carries its own copy of click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    from querydet_models.errors import ModelError

    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.NoArgsIsHelpError as err:
        print(err.format_message(), file=sys.stderr)
        sys.exit(2)
    except click.UsageError as err:  # bad option values: one line, not click's usage box
        message = err.format_message().replace("Value error, ", "")
        print(f"querydet: error: {message}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as err:
        print(f"querydet: error: {err.format_message()}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.Abort:
        print("querydet: interrupted", file=sys.stderr)
        sys.exit(130)
    except QueryDetError as err:
        kind = "" if err.exit_code == 130 else "error: "  # an interrupt is not a mistake
        print(f"querydet: {kind}{err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except ModelError as err:
        print(f"querydet: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("querydet: interrupted", file=sys.stderr)
        sys.exit(130)
