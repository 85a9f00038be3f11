"""`querydet bench`, `bench-detect` and `bench-gsd`: measurements printed as ratios of one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from querydet_models.config import CONTEXTS

from .shared import Backbone, Detector, Device, _precision_list, app, comma_list, pixels
from ..core.errors import QueryDetError


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
    backends: Annotated[str, typer.Option(help="Sparse backends to time for exact CSQ, comma-separated: torch (gather-GEMM), spconv, blocks (gathered blocks through the dense convolutions), triton (one fused kernel per conv; CUDA); those that cannot run here are skipped")] = "torch,spconv,blocks,triton",
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per mode (median reported)")] = 3,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint to bench instead of random weights")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image file to use instead of random pixels")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads")] = None,
    precision: Annotated[str, typer.Option(help="Precisions to time, comma-separated: auto, fp32, tf32 (CUDA; fp32 elsewhere), bf16, fp16 (one set of rows each)")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for weights, input and simulated objects")] = 0,
    runtimes: Annotated[bool, typer.Option("--runtimes", help="Also the model exported (querydet export) on onnxruntime (fp32) and OpenVINO (fp32, bf16): dense-HR and exact CSQ rows")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout")] = False,
) -> None:
    """Time dense-HR, CSQ (exact, paper context), CQ, CCQ and the family's baseline on one input."""
    if paper_context not in CONTEXTS or paper_context == "exact":
        raise QueryDetError(f"--paper-context must be one of {', '.join(CONTEXTS[1:])}")
    names = comma_list(backends, "--backends")
    from querydet_models.layers.sparse import SPARSE_BACKENDS

    bad = [b for b in names if b not in SPARSE_BACKENDS]
    if bad or not names:
        raise QueryDetError(f"--backends: unknown backend {bad[0] if bad else '(none)'} "
                            f"(allowed: {', '.join(SPARSE_BACKENDS)})")
    precisions = _precision_list(precision)
    from ..bench.heads import BenchOptions, format_report, run_bench
    from ..runtimes.loading import load_model, resolve_device

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

    extra = None
    if runtimes:
        from ..bench.runtime import graph_rows as extra
    report = run_bench(opts, model=model, image=image, progress=progress, extra_rows=extra)
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
    tile_size: Annotated[Optional[int], typer.Option(min=64, max=8192, help="querydet's tile side (default: detect's, 2304 on the CPU, 1024 on CUDA); SAHI's slices stay 1024 with 128 overlap, as its users run it")] = None,
    overlap: Annotated[int, typer.Option(parser=pixels, help="Tile overlap in pixels")] = 128,
    batch_size: Annotated[Optional[int], typer.Option(min=1, max=256, help="Tiles per batch (default: 1 on the CPU, 4 on CUDA)")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    precision: Annotated[str, typer.Option(help="Precisions for the throughput rows, comma-separated (the first is the reference)")] = "fp32,auto",
    peer: Annotated[Optional[str], typer.Option(help="sahi: the same raster and weights through SAHI, in the same run (pip install 'querydet\\[bench]')")] = None,
    truth: Annotated[Optional[Path], typer.Option(help="COCO ground truth of --raster, for AP in the --peer rows")] = None,
    rounds: Annotated[int, typer.Option(min=1, max=20, help="Interleaved rounds of the --peer / --ray-rasters comparisons (median)")] = 3,
    scene: Annotated[Optional[str], typer.Option(help="Instead of --raster: a synthetic busy (objects everywhere) or survey (objects in a tenth, nodata collar) GeoTIFF with its ground truth, written to --workdir")] = None,
    scene_size: Annotated[int, typer.Option(min=512, max=65536, help="Side of the --scene raster")] = 4096,
    ray_rasters: Annotated[int, typer.Option(min=0, max=1000, help="Ray scaling: detect on this many synthetic rasters with 1 and 2 single-thread actors")] = 0,
    ray_size: Annotated[int, typer.Option(min=256, max=16384, help="Side of the --ray-rasters rasters")] = 2048,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout")] = False,
    whole_process: Annotated[bool, typer.Option("--whole-process", help="With --peer sahi: each side a fresh process timed as `time` would (imports and model load included): querydet detect at its defaults and fp32, a SAHI script in fp32 and bf16")] = False,
    runtimes: Annotated[bool, typer.Option("--runtimes", help="torch, onnxruntime and OpenVINO (fp32, bf16, int8) side by side on --raster/--scene: in-process and whole-process seconds, AP per row")] = False,
    export: Annotated[Optional[Path], typer.Option(help="With --runtimes: the export to time (default: the checkpoint exported into --workdir, int8 calibrated on a raster of another seed)")] = None,
) -> None:
    """Peak memory of detect on growing rasters, and CSQ vs dense megapixels per second."""
    from ..core.resources import sample_model, sample_scene

    size_list = list(comma_list(sizes, "--sizes", int, "numbers like 4096,16384"))
    if any(not 256 <= s <= 65536 for s in size_list):
        raise QueryDetError("--sizes: each size must be in 256..65536")
    from ..pipeline.tiling import check_default_plan

    check_default_plan(tile_size, overlap)
    if scene not in (None, "busy", "survey"):
        raise QueryDetError(f"--scene: {scene!r} is not one of busy, survey")
    if scene is not None:
        if raster is not None or truth is not None:
            raise QueryDetError("--scene makes its own raster and truth: not with --raster/--truth")
        raster, truth = _scene_raster(scene, scene_size, workdir)
    raster_path = str(sample_scene()) if raster is None else raster
    if raster_path and not Path(raster_path).is_file():
        raise QueryDetError(f"--raster: file not found: {raster_path}")
    if not size_list and not raster_path:
        raise QueryDetError("nothing to measure: --sizes is empty and --raster is ''")
    precisions = _precision_list(precision)
    w = str(weights or sample_model())
    if not Path(w).is_file():
        raise QueryDetError(f"checkpoint not found: {w}")
    from ..bench.detect import format_report, run
    from ..runtimes.loading import resolve_device

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
        from ..bench.sahi_peer import _sahi_base

        _sahi_base()  # says how to install SAHI when it is missing
    if whole_process or runtimes:
        _one_raster_bench(peer, raster_path, w, truth, rounds, json_out, runtimes, export, workdir,
                          tile_size, overlap, dev)
        return
    tile_size = tile_size or _default_tile(dev)
    report = run(size_list, w, workdir, raster_path or None, dev, tile_size, overlap, batch_size,
                 precisions, peer=peer, truth=truth, rounds=rounds, ray_rasters=ray_rasters,
                 ray_size=ray_size)
    print(json.dumps(report) if json_out else format_report(report))


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

    from ..bench.gsd import format_report, run

    with tempfile.TemporaryDirectory() as tmp:
        report = run(str(weights) if weights else None, workdir or Path(tmp), size, seed, rounds,
                     device.value)
    print(json.dumps(report) if json_out else format_report(report))


def _scene_raster(scene: str, size: int, workdir: Path) -> tuple[str, Path]:
    """bench-detect --scene: the synthetic busy or survey raster and its truth, written once."""
    from ..training.synthetic import write_big_raster, write_survey_raster

    workdir.mkdir(parents=True, exist_ok=True)
    raster = workdir / f"{scene}_{size}.tif"
    truth = workdir / f"{scene}_{size}.json"
    if not (raster.is_file() and truth.is_file()):
        print(f"bench-detect: writing {raster} ...", file=sys.stderr, flush=True)
        if scene == "busy":
            write_big_raster(raster, size, truth=truth)
        else:
            write_survey_raster(raster, size, truth)
    return str(raster), truth


def _default_tile(device: str) -> int:
    """detect's tile side on `device` (exported models run on the CPU)."""
    import torch

    from ..pipeline.producer import default_tile_size

    return default_tile_size(torch.device(device))


def _one_raster_bench(peer: Optional[str], raster: str, weights: str, truth: Optional[Path],
                      rounds: int, json_out: bool, runtimes: bool, export: Optional[Path],
                      workdir: Path, tile_size: int | None, overlap: int, device: str = "cpu"
                      ) -> None:
    """bench-detect --peer sahi --whole-process (bench_whole.py) or --runtimes
    (bench_runtime.py)."""
    if not raster:
        raise QueryDetError("--runtimes and --whole-process measure one raster: give --raster or --scene")
    if runtimes:
        from ..bench.runtime import format_runtime, run_runtime_bench
        from ..runtimes.runtime import is_export

        if export is not None and not is_export(export):
            raise QueryDetError(f"--export {export}: not a folder written by querydet export")
        workdir.mkdir(parents=True, exist_ok=True)
        report = run_runtime_bench(raster, weights, export, truth, rounds, workdir,
                                   tile_size or _default_tile("cpu"), overlap)
        print(json.dumps(report) if json_out else format_runtime(report))
        return
    if peer != "sahi":
        raise QueryDetError("--whole-process times querydet against a peer: add --peer sahi")
    from ..bench.whole import format_whole, run_whole_process

    # querydet's rows at the asked tile plan; SAHI's slices stay 1024 / 128, as its users run it
    plan = (["--tile-size", str(tile_size)] if tile_size else []) + ["--overlap", str(overlap)]
    report = run_whole_process(raster, weights, truth, rounds, detect_args=plan,
                               device="cuda" if device.startswith("cuda") else "cpu")
    print(json.dumps(report) if json_out else format_whole(report))
