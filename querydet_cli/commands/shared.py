"""What the `querydet` commands share: the Typer app, choice lists, option checks.

Nothing here imports torch: `querydet --help`, `--version` and `configs` answer without it.
"""

from __future__ import annotations

import logging
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, get_args, get_type_hints

import typer

from querydet_models.config import BACKBONES, CONTEXTS, InferenceConfig, ModelConfig

from ..core.config import DataConfig
from ..core.errors import QueryDetError
from ..outputs import formats
from ..runtimes.runtime import RUNTIMES

log = logging.getLogger("querydet")


def _choices(name: str, values) -> type[Enum]:
    """A str Enum of `values`, so help and shell completion list them (Typer choice option)."""
    return Enum(name, {v: v for v in values}, type=str)


class Recipe(str, Enum):
    finetune = "finetune"
    refine = "refine"
    config = "config"


def _literal(cls: type, field: str) -> tuple[str, ...]:
    """The allowed values of a config field typed `Literal[...]` (the config is the source)."""
    return get_args(get_type_hints(cls)[field])


# every list below is defined once elsewhere, in modules that do not import torch
Device = _choices("Device", ("auto", "cpu", "cuda"))  # auto: CUDA when available
Mode = _choices("Mode", _literal(InferenceConfig, "mode"))
Backend = _choices("Backend", _literal(InferenceConfig, "backend"))
Precision = _choices("Precision", _literal(InferenceConfig, "precision"))
# detect's: int8 runs an export quantised with `querydet export --calibrate`
DetectPrecision = _choices("DetectPrecision", (*_literal(InferenceConfig, "precision"), "int8"))
Runtime = _choices("Runtime", RUNTIMES)
Detector = _choices("Detector", _literal(ModelConfig, "detector"))
Backbone = _choices("Backbone", BACKBONES)
Dataset = _choices("Dataset", _literal(DataConfig, "dataset"))
OutputFormat = _choices("OutputFormat", formats.names())
MergeMetric = _choices("MergeMetric", ("iou", "ios"))
Protocol = _choices("Protocol", ("coco", "visdrone"))


def _context(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in CONTEXTS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(CONTEXTS)}")
    return value


def comma_list(text: str, option: str, convert=str, what: str = "values separated by commas"
               ) -> tuple:
    """The CLI's one comma-list parser: items stripped, empty ones dropped, each converted; an
    item that does not convert is one line naming the option."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return tuple(convert(t) for t in items)
    except ValueError:
        raise QueryDetError(f"{option}: expected {what}, got {text!r}") from None


def pixels(value: str) -> int:
    """An option in whole pixels (--overlap): "1.0" or "0.5" is refused, not read as 1 or 0,
    since overlaps were once fractions of the tile."""
    text = str(value).strip()
    if not text.isdigit():
        raise typer.BadParameter(f"{value!r} is not a whole number of pixels (0 or more; the "
                                 "overlap is in pixels, not a fraction of the tile)")
    return int(text)


def _precision_list(value: str) -> tuple[str, ...]:
    """--precision of the bench commands: one or more precisions, comma-separated."""
    precisions = comma_list(value, "--precision")
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


def _folder_option(path: Path, option: str) -> None:
    """An output folder option that names an existing file is a usage error, found first."""
    if path.exists() and not path.is_dir():
        raise QueryDetError(f"{option} {path} is a file, not a folder")


def _parse_bounds(text: str, option: str) -> tuple[float, float, float, float]:
    """XMIN,YMIN,XMAX,YMAX with XMIN < XMAX and YMIN < YMAX."""
    what = "XMIN,YMIN,XMAX,YMAX with XMIN < XMAX and YMIN < YMAX"
    box = comma_list(text, option, float, what)
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or \
            not (box[0] < box[2] and box[1] < box[3]):
        raise QueryDetError(f"{option}: expected {what}, got {text!r}")
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
