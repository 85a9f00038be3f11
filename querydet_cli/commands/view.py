"""`querydet view`: the detections of any output over their imagery, as one offline web page
(or served with map tiles for rasters too large to embed). The page and tile code is in view.py
and view_server.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.errors import QueryDetError
from ..outputs import formats
from .shared import app


@app.command()
def view(
    detections: Annotated[Path, typer.Argument(help=f"A querydet output: {formats.suffix_help()}")],
    *,
    raster: Annotated[Optional[list[str]], typer.Option("--raster", "-r", help="The imagery under the boxes (repeat for several); matched to the detections' sources by path or file name")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The page to write (default: next to DETECTIONS, .html)")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Serve the page and full-resolution map tiles of each raster on 127.0.0.1 instead of writing a file")] = False,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port for --serve (0: any free one)")] = 8765,
    embed_max: Annotated[int, typer.Option(min=256, max=8192, help="Largest side in pixels of an embedded raster (a larger one is embedded as its overview)")] = 2048,
    min_score: Annotated[float, typer.Option(min=0.0, max=1.0, help="Score slider's starting value")] = 0.0,
    title: Annotated[Optional[str], typer.Option(help="Page title (default: the detections file's name)")] = None,
    edit: Annotated[bool, typer.Option("--edit", help="Correct the detections of one --raster: delete, draw, move, resize, reclass boxes, mark reviewed areas, undo; saved as labels that tile --labels / --annotations learn from (with --serve to the --save file, else a download)")] = False,
    save: Annotated[Optional[Path], typer.Option(help="--edit: the corrected file saves go to (.gpkg or .geojson; .json COCO for an image without a georeference); default: a corrected file itself, else DETECTIONS' name .corrected.gpkg")] = None,
    classes: Annotated[Optional[str], typer.Option(help="--edit: classes a box may take besides the detections' own, comma-separated (the keys 1-9 pick them in this order)")] = None,
) -> None:
    """A web map of detections over their imagery: score slider, class toggles, counts, click
    for properties; offline (no network), 100 000 boxes drawn on canvas tiles. With --edit, a
    person corrects them on the map and saves labels to train on."""
    rasters = list(raster or [])
    target = output or detections.with_suffix(".edit.html" if edit else ".html")
    if target == detections:
        raise QueryDetError(f"--output {target} is the detections file; give another name")
    if (save is not None or classes is not None) and not edit:
        raise QueryDetError("--save and --classes are options of --edit")
    if edit:
        return _edit(detections, rasters, target, save, classes, serve, port, embed_max,
                     min_score, title or detections.name)
    if serve:
        from ..viewer.page import check_boxes, read_detections

        boxes = read_detections(detections)
        check_boxes(boxes, detections)
        return _serve(boxes, rasters, title or detections.name, min_score, port)
    check_page_target(target, [str(detections), *rasters])
    write_view(detections, rasters, target, embed_max, min_score, title or detections.name)


def write_view(detections: Path, rasters: list[str], target: Path, embed_max: int,
               min_score: float, title: str) -> None:
    """Read the detections and rasters, and write the page whole (view, detect --html)."""
    import sys

    from ..viewer.page import build_page, check_boxes, raster_view, read_detections, render, write_page

    boxes = read_detections(detections)
    check_boxes(boxes, detections)
    views = [raster_view(r, embed_max) for r in rasters]
    write_page(render(build_page(boxes, views, title, min_score)), target)
    print(f"querydet: {len(boxes):,} detections over {len(views)} raster(s) -> {target}",
          file=sys.stderr)


def check_page_target(target: Path, inputs: list[str], folder_made: bool = False) -> None:
    """The page must not overwrite an input, nor be a folder; its folder must exist (unless the
    run makes it: detect --html writes beside an output whose folder detect creates)."""
    from ..reading.inputs import refuse_output_over_inputs

    if target.is_dir():
        raise QueryDetError(f"--output {target} is a directory; give a file name")
    if not folder_made and not target.parent.is_dir():
        raise QueryDetError(f"--output {target}: folder {target.parent} does not exist")
    refuse_output_over_inputs(str(target), inputs)


def _edit(detections: Path, rasters: list[str], target: Path, save: Path | None,
          classes: str | None, serve: bool, port: int, embed_max: int, min_score: float,
          title: str) -> None:
    """view --edit: one raster's boxes made editable, served (saves write --save) or as an
    offline page (saves are downloads)."""
    import sys

    from .shared import comma_list
    from ..viewer.editing import open_session

    if len(rasters) != 1:
        raise QueryDetError("--edit corrects the detections of one raster: give it with --raster")
    if not detections.is_file():
        raise QueryDetError(f"{detections}: file not found")
    if not serve:
        check_page_target(target, [str(detections), *rasters])
    names = list(comma_list(classes, "--classes")) if classes else []
    session = open_session(detections, rasters[0], save, names, served=serve)
    if serve:
        return _serve(session.boxes, rasters, title, min_score, port, session)
    from ..viewer.page import build_page, raster_view, render, write_page

    page = build_page(session.boxes, [raster_view(rasters[0], embed_max)], title, min_score,
                      groups=session.groups())
    page.classes, page.edit = session.classes, session.page_settings()
    write_page(render(page), target)
    print(f"querydet: {len(session.boxes):,} boxes to correct -> {target} (open it in a "
          f"browser; Download saves {page.edit['download']})", file=sys.stderr)


def _serve(boxes, rasters: list[str], name: str, min_score: float, port: int,
           session=None) -> None:
    import os
    import sys

    os.environ.setdefault("GDAL_CACHEMAX", "64")  # MB, read by GDAL before the first block
    from ..viewer.page import SourceView, build_page, render
    from ..viewer.server import TileSource, serve

    tiles = [TileSource(r) for r in rasters]
    views = [SourceView(Path(r).name, t.source.width, t.source.height, t.maxzoom,
                        tiles=f"tiles/{k}/{{z}}/{{x}}/{{y}}.png", path=r)
             for k, (r, t) in enumerate(zip(rasters, tiles))]
    page = build_page(boxes, views, name, min_score,
                      groups=session.groups() if session else None)
    saver = None
    if session is not None:
        from ..viewer.editing import SaveEndpoint

        page.classes, page.edit = session.classes, session.page_settings()
        saver = SaveEndpoint(session)
    serve(render(page), tiles, port,
          announce=lambda line: print(line, file=sys.stderr, flush=True), saver=saver)
