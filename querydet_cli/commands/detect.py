"""`querydet detect`: options into one run over the inputs (pipeline/detect.py), the summary
and the optional page. Nothing here imports torch at module level."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.errors import QueryDetError
from ..outputs import formats
from ..reading.inputs import is_video
from .shared import (Backend, Device, DetectPrecision, MergeMetric, Mode, OutputFormat, Runtime,
                     _context, _folder_option, app, comma_list, log, pixels)


@app.command()
def detect(
    inputs: Annotated[list[str], typer.Argument(help="GeoTIFFs, images, folders, globs; - reads paths from stdin")],
    *,
    output: Annotated[str, typer.Option("--output", "-o", help=f"Output file ({formats.suffix_help()}) or - for stdout")] = "detections.geojson",
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint, or a folder written by querydet export (default: the bundled sample model)")] = None,
    fmt: Annotated[Optional[OutputFormat], typer.Option("--format", help="Output format (default: from the suffix)")] = None,
    runtime: Annotated[Runtime, typer.Option(help="What runs the network: torch (a checkpoint), onnxruntime or openvino (an export folder); auto: torch for a checkpoint, else the fastest installed")] = Runtime.auto,
    sigma: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Query threshold of CSQ")] = None,
    no_csq: Annotated[bool, typer.Option("--no-csq", help="Dense inference on every level")] = False,
    mode: Annotated[Optional[Mode], typer.Option(help="Inference mode (default: the checkpoint's)")] = None,
    context: Annotated[Optional[str], typer.Option(callback=_context, help="exact or 1x1..11x11 (paper submanifold)")] = None,
    backend: Annotated[Optional[Backend], typer.Option(help="Sparse backend (default: the checkpoint's)")] = None,
    score_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Drop detections scoring below this (eval uses the config's 0.05 for AP)")] = 0.3,
    tile_size: Annotated[Optional[int], typer.Option(min=64, max=8192, help="Tile side in pixels (default: 2304 on the CPU, 1024 on CUDA)")] = None,
    overlap: Annotated[int, typer.Option(parser=pixels, help="Tile overlap in pixels")] = 128,
    batch_size: Annotated[Optional[int], typer.Option(min=1, max=256, help="Tiles per batch (default: 1 on the CPU, 4 on CUDA)")] = None,
    bands: Annotated[Optional[str], typer.Option(help="Bands to use, 1-based, e.g. 3,2,1 (default: RGB / first three)")] = None,
    merge_metric: Annotated[MergeMetric, typer.Option(help="Overlap measure of duplicate views: ios (intersection over the smaller box; also drops a tile's nested duplicates) or iou (views across tiles only)")] = MergeMetric.ios,
    merge_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Overlap at which two views are one object")] = 0.5,
    rfc7946: Annotated[bool, typer.Option("--rfc7946", help="GeoJSON in EPSG:4326 lon/lat (RFC 7946)")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run into the same output")] = False,
    save_vis: Annotated[Optional[Path], typer.Option(help="Folder for PNG overviews with boxes and query heatmap; for a video input, the video to render with its detections drawn (OUT.mp4)")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available")] = Device.auto,
    precision: Annotated[Optional[DetectPrecision], typer.Option(help="Inference precision (default: the checkpoint's, auto); int8: an export made with --calibrate")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
    coco_gt: Annotated[Optional[Path], typer.Option(help="COCO ground truth: COCO results take its image ids, matched by file name")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="Print seconds per pipeline stage on stderr (also with -v; always in --json)")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Run the model on Ray: auto (a running cluster, else a local one) or ADDRESS (host:port); pip install 'querydet\\[ray]'")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, max=4096, help="Tiles computed at once: threads here (default: 2 on a CPU of 2 or more cores, 1 on CUDA), or Ray actors with --ray (default 2), each holding the model once")] = None,
    readers: Annotated[Optional[int], typer.Option(min=1, max=64, help="Threads decoding windows, each on its own handle of the raster (default: 1 on the CPU, a quarter of the cores on CUDA)")] = None,
    gpus_per_worker: Annotated[float, typer.Option(min=0.0, max=16.0, help="GPUs per Ray actor (0: CPU actors)")] = 0.0,
    threads_per_worker: Annotated[Optional[int], typer.Option(min=1, max=256, help="torch threads per worker (default: torch's threads shared out; 1 per Ray actor, and its Ray CPUs)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (not with -o -)")] = False,
    gsd: Annotated[str, typer.Option("--gsd", help="Ground resolution to read rasters at: auto (the model's training GSD), native (the raster's own pixels) or metres per pixel")] = "auto",
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: each tile in its eight dihedral views (8x the compute), the answers voted into one")] = False,
    input_gsd: Annotated[Optional[float], typer.Option("--input-gsd", help="Metres per pixel of inputs without a georeference (drone frames, plain images); overrides a georeference")] = None,
    html: Annotated[bool, typer.Option("--html", help="Also write a web page of the detections over the imagery next to the output (OUTPUT with .html; see querydet view)")] = False,
    frame_stride: Annotated[int, typer.Option(min=1, help="Videos: detect on every N-th frame")] = 1,
    fps: Annotated[Optional[float], typer.Option("--fps", help="Videos: detect on this many frames a second (instead of --frame-stride)")] = None,
    start: Annotated[float, typer.Option(min=0.0, help="Videos: from this time, in seconds")] = 0.0,
    end: Annotated[Optional[float], typer.Option(help="Videos: up to this time, in seconds (default: the end)")] = None,
    track: Annotated[bool, typer.Option("--track", help="Videos: follow objects across frames (ByteTrack), each with a stable track_id; distinct objects per class in the summary")] = False,
    telemetry: Annotated[Optional[str], typer.Option(help="Videos: a DJI-style .SRT sidecar (or auto: each video's own NAME.SRT) placing nadir frames on the ground, so outputs are lon/lat (EPSG:4326)")] = None,
    hfov: Annotated[Optional[float], typer.Option(min=1.0, max=170.0, help="Videos with --telemetry: the camera's horizontal field of view in degrees")] = None,
) -> None:
    """Detect small objects in huge GeoTIFFs and drone frames, tile by tile, with CSQ.

    Exit codes: 0 all inputs done; 1 some inputs failed (the rest are in the output);
    2 usage or input error, nothing written; 130 interrupted (no output; --resume continues).
    """
    from ..outputs.formats import format_for
    from ..reading.gsd import check_input_gsd, parse_gsd_option

    out_format = format_for(output, fmt.value if fmt else None)
    _check_detect_usage(output, ray, gpus_per_worker, json_out, no_csq, mode, overlap,
                        tile_size, save_vis)
    band_list = _parse_bands(bands)
    gsd_option, input_gsd = parse_gsd_option(gsd), check_input_gsd(input_gsd)
    paths, items, video_vis = _inputs(inputs, output, out_format,
                                      _frames(frame_stride, fps, start, end), track,
                                      ray=ray, html=html, save_vis=save_vis, resume=resume,
                                      telemetry=(telemetry, hfov))
    page = _page_target(output, paths) if html else None
    options = dict(tile_size=tile_size, overlap=overlap, batch_size=batch_size,
                   mode="dense" if no_csq else (mode.value if mode else None), sigma=sigma,
                   context=context, backend=backend.value if backend else None,
                   score_threshold=score_threshold, bands=band_list,
                   merge_metric=merge_metric.value, merge_threshold=merge_threshold,
                   rfc7946=rfc7946, resume=resume, save_video=video_vis,
                   save_vis=str(save_vis) if save_vis and not video_vis else None,
                   precision=precision.value if precision else None, profile=profile,
                   gsd=gsd_option, input_gsd=input_gsd, tta=tta, track=track, readers=readers)
    ray_settings = _workers(options, ray, workers, gpus_per_worker, threads_per_worker)
    _check_runtime_usage(weights, runtime.value, options, ray)
    summary = _detect_locked(items, output, out_format, options, weights, device.value, coco_gt,
                             ray_settings, quiet, runtime.value)
    _report(summary, output, profile, json_out)
    if page is not None and summary.output_written:
        _write_page(output, page, paths, summary)
    _exit_for(summary)


def _exit_for(summary) -> None:
    """Exit 0 when every input was done; else 2 when none was (an input error, nothing
    written), 1 for a partial run. Each error was printed once, when it happened."""
    if summary.failed:
        print(f"querydet: {len(summary.failed)} input(s) failed (errors above)", file=sys.stderr)
        raise typer.Exit(2 if summary.done == 0 else 1)


def _inputs(inputs: list[str], output: str, out_format, selection, track: bool, *,
            ray: Optional[str], html: bool, save_vis: Optional[Path], resume: bool,
            telemetry: tuple[Optional[str], Optional[float]]
            ) -> tuple[list[str], list, Optional[str]]:
    """The run's inputs: paths as given (expanded), what the run reads (each video in its
    chosen frames), and the video to render (--save-vis with a video input). What cannot go
    with video frames is refused here, before anything runs."""
    from ..reading.inputs import expand_inputs, refuse_output_over_inputs
    from ..reading.video import Video

    paths = expand_inputs(inputs)
    refuse_output_over_inputs(output, paths)
    if output != "-" and Path(output).is_dir():
        raise QueryDetError(f"output {output} is a directory; give a file name")
    videos = [p for p in paths if is_video(p)]
    if not videos:
        given = [name for name, on in (("--track", track), ("--telemetry", telemetry[0]),
                                       ("--frame-stride", selection.stride > 1),
                                       ("--fps", selection.fps is not None),
                                       ("--start", selection.start > 0),
                                       ("--end", selection.end is not None)) if on]
        if given:
            raise QueryDetError(f"{given[0]} is for video inputs (.mp4, .mov, .mkv); none given")
        return paths, paths, None
    if out_format.needs_crs and telemetry[0] is None:
        raise QueryDetError(f"video frames have no map coordinates for {out_format.name}: use "
                            f"{formats.map_free_choices()}, or --telemetry")
    for option, on in (("--ray", ray is not None), ("--html", html)):
        if on:  # Ray's actors and the page read rasters by path
            raise QueryDetError(f"{option} does not go with video inputs: run them without it")
    if save_vis is not None and (not is_video(save_vis) or len(videos) > 1):
        raise QueryDetError("with a video input, --save-vis names the video to render (OUT.mp4, "
                            ".mov or .mkv), for one input video")
    if save_vis is not None:
        refuse_output_over_inputs(str(save_vis), paths)
        if resume:
            raise QueryDetError("--save-vis renders the video from its first frame: it cannot "
                                "continue an interrupted run (leave out --resume or --save-vis)")
    selection.check()
    items: list = []
    for p in paths:
        items.extend(Video(p).frames(selection) if is_video(p) else [p])
    if telemetry[0] is not None:
        from ..reading.video import place_frames

        items = place_frames(items, *telemetry)
    return paths, items, None if save_vis is None else str(save_vis)


def _frames(stride: Optional[int], fps: Optional[float], start: float, end: Optional[float]):
    from ..reading.video import FrameSelection

    return FrameSelection(stride, fps, start, end)


def _detect_locked(paths: list[str], output: str, out_format, options: dict,
                   weights: Optional[Path], device: str, coco_gt: Optional[Path],
                   ray_settings: Optional[dict], quiet: bool, runtime: str = "auto"):
    """Take the output's lock (before torch loads, so a second run is refused at once) and run
    the request (`api.run`: the Python API's and the benchmarks' door too); Ctrl-C ends with
    the command that continues."""
    import contextlib

    from ..core.locking import claim_output

    with claim_output(output) if output != "-" else contextlib.nullcontext() as lock:
        from ..api import DetectRequest, run
        from ..core import allocator
        from ..pipeline.detect import DetectInterrupted
        from ..pipeline.options import DetectOptions

        if allocator.owns_process():  # every tile's activations reuse the last one's pages
            allocator.keep_freed_memory()
        ray = None
        if ray_settings is not None:
            from ..pipeline.ray_producer import RaySettings

            ray = RaySettings(**ray_settings)
        request = DetectRequest(paths, output, out_format, DetectOptions(**options), weights,
                                device, runtime, ray, coco_gt, progress=not quiet)
        try:
            return run(request, lock=lock)
        except DetectInterrupted as err:
            if err.resumable:
                import shlex

                args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
                raise QueryDetError(f"{err}; continue with: {shlex.join(['querydet', *args])}",
                                    exit_code=130) from None
            raise


def _check_runtime_usage(weights: Optional[Path], runtime: str, options: dict,
                         ray: Optional[str]) -> None:
    """What a runtime cannot do, said before anything is made: int8 on torch, Ray with an
    export, the inference modes an export does not hold."""
    from ..runtimes.runtime import choose_runtime

    from ..core.resources import sample_model

    chosen = choose_runtime(runtime, weights or sample_model())
    if chosen == "torch":
        if options["precision"] == "int8":
            raise QueryDetError("--precision int8 runs an exported model: querydet export "
                                "WEIGHTS --calibrate CHIPS -o DIR, then --weights DIR")
        return
    if ray is not None:
        raise QueryDetError(f"--ray runs the torch runtime; {weights} is an export "
                            "(give the checkpoint to --weights)")
    from querydet_models.export.graph_infer import check_graph_options

    try:
        check_graph_options(options["mode"] or "csq", None, options["context"], 0)
    except ValueError as err:
        raise QueryDetError(f"--runtime {chosen}: {err}") from None


def _workers(options: dict, ray: Optional[str], workers: Optional[int], gpus: float,
             threads: Optional[int]) -> Optional[dict]:
    """Where `detect`'s tiles are computed: the Ray settings with --ray (2 actors of one
    thread by default), else None, and the local workers and threads put into `options`."""
    if ray is None:
        options |= dict(workers=workers, threads=threads)
        return None
    return dict(address=ray, workers=workers or 2, gpus_per_worker=gpus,
                threads_per_worker=threads or 1)


def _check_detect_usage(output: str, ray, gpus_per_worker: float, json_out: bool,
                        no_csq: bool, mode, overlap: int, tile_size: int | None,
                        save_vis: Optional[Path]) -> None:
    """`detect` options that contradict each other: one line each, before anything is made."""
    if ray is None and gpus_per_worker:
        raise QueryDetError("--gpus-per-worker goes with --ray")
    if ray is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise QueryDetError("--ray needs Ray: pip install 'querydet[ray]'")
    if json_out and output == "-":
        raise QueryDetError("--json prints a summary on stdout, where -o - writes detections: "
                            "choose one")
    if no_csq and mode not in (None, Mode.dense):
        raise QueryDetError("--no-csq and --mode contradict each other")
    from ..pipeline.tiling import check_default_plan

    check_default_plan(tile_size, overlap)
    if save_vis is not None and not is_video(save_vis):
        _folder_option(save_vis, "--save-vis")  # a folder of overviews (a video is a file)


def _page_target(output: str, paths: list[str]) -> Path:
    """Where `detect --html` puts its page (OUTPUT with .html), checked before the run."""
    from .view import check_page_target

    if output == "-":
        raise QueryDetError("--html writes a page next to the output file: not with -o -")
    target = Path(output).with_suffix(".html")
    if target == Path(output):
        raise QueryDetError(f"--html: the output {output} already ends in .html; name it "
                            f"{formats.suffix_help()}")
    check_page_target(target, paths, folder_made=True)
    return target


def _write_page(output: str, page: Path, paths: list[str], summary) -> None:
    """The page of a finished run: its output over the inputs that succeeded, embedded (the
    more inputs, the smaller each picture; `querydet view --serve` shows full resolution)."""
    from .view import write_view

    failed = {p for p, _ in summary.failed}
    done = [p for p in paths if p not in failed]
    embed = 2048 if len(done) <= 4 else 1024 if len(done) <= 16 else 512
    write_view(Path(output), done, page, embed, 0.0, Path(output).name)


def _parse_bands(bands: Optional[str]) -> Optional[tuple[int, ...]]:
    """--bands: one band (grey) or three (R,G,B), numbered from 1."""
    if not bands:
        return None
    band_list = comma_list(bands, "--bands", int, "band numbers like 3,2,1")
    if len(band_list) not in (1, 3) or any(b < 1 for b in band_list):
        raise QueryDetError(f"--bands: one band (grey) or three (R,G,B), numbered from 1; "
                            f"got {bands!r}")
    return band_list


def _report(summary, output: str, profile: bool, json_out: bool) -> None:
    """The summary line on stderr, the profile when asked, and --json on stdout."""
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
    if summary.objects is not None:
        kinds = ", ".join(f"{n} {name}" for name, n in summary.objects.items()) or "none"
        print(f"querydet: {sum(summary.objects.values())} distinct objects followed: {kinds}",
              file=sys.stderr)
    if summary.profile and (profile or log.isEnabledFor(logging.INFO)):
        from ..pipeline.profile import format_profile

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
                          "precision": summary.precision, "runtime": summary.runtime,
                          "profile": summary.profile}
                         | ({"objects": summary.objects} if summary.objects is not None else {})))
