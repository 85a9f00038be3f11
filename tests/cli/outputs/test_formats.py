"""The output formats: every format writes the bytes its golden file holds (written by the
writers before formats became one list of classes), GeoPackage holds the same rows, every
format reads back the records it wrote, and the CLI's choices and help derive from the list."""

import json
import sys
from pathlib import Path

import pytest

from querydet_cli.core.errors import QueryDetError
from querydet_cli.outputs import formats
from querydet_cli.outputs.formats import FORMATS, Coco, Csv, GeoJSON, GeoPackage, Mot, Ndjson
from querydet_cli.outputs.geometry import to_lonlat
from querydet_cli.outputs.records import Detection
from querydet_cli.outputs.writers import OutputWriter

from .golden_records import PLAIN, PROJECTED

GOLDEN = Path(__file__).parent / "golden"


def _records(rows: list[dict]) -> list[Detection]:
    return [Detection.from_json(r) for r in rows]


def _lonlat(rows: list[dict]) -> list[dict]:
    return [r | {"crs": "EPSG:4326", "geometry": to_lonlat(r["geometry"], r["crs"])}
            for r in rows]


CASES = [("projected", PROJECTED, "EPSG:32617", False, GeoJSON),
         ("projected", PROJECTED, "EPSG:32617", False, Coco),
         ("projected", PROJECTED, "EPSG:32617", False, Csv),
         ("projected", PROJECTED, "EPSG:32617", False, Ndjson),
         ("rfc7946", _lonlat(PROJECTED), None, True, GeoJSON),
         ("rfc7946", _lonlat(PROJECTED), None, True, Ndjson),
         ("plain", PLAIN, None, False, Coco),
         ("plain", PLAIN, None, False, Csv),
         ("plain", PLAIN, None, False, Ndjson)]


@pytest.mark.parametrize("name,rows,crs,rfc7946,fmt", CASES,
                         ids=[f"{c[0]}-{c[4].name}" for c in CASES])
def test_each_format_writes_its_golden_bytes(tmp_path, name, rows, crs, rfc7946, fmt):
    target = tmp_path / f"{name}{fmt.suffixes[0]}"
    with OutputWriter(str(target), fmt, crs, rfc7946) as writer:
        writer.write(_records(rows))
    assert writer.count == len(rows)
    assert target.read_bytes() == (GOLDEN / target.name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no partial file left


def test_geopackage_holds_the_rows_in_their_crs(tmp_path):
    import pyogrio

    target = tmp_path / "d.gpkg"
    with OutputWriter(str(target), GeoPackage, "EPSG:32617") as writer:
        writer.write(_records(PROJECTED))
    frame = pyogrio.read_dataframe(target)
    assert frame.crs.to_epsg() == 32617
    assert list(frame.columns) == ["source", "image_id", "class_id", "category_id", "class_name",
                                   "score", "x1", "y1", "x2", "y2", "geometry"]
    assert frame["class_name"].tolist() == ["car", "tree, oak"]
    assert frame["category_id"].tolist() == [1, 7]
    assert list(frame.geometry[0].exterior.coords)[0] == (403010.0, 3285020.0)
    assert [d.bbox for d in GeoPackage.read(target)] == [tuple(r["bbox"]) for r in PROJECTED]


@pytest.mark.parametrize("fmt", [GeoJSON, Coco, Csv, Ndjson], ids=lambda f: f.name)
def test_each_format_reads_back_what_it_wrote(tmp_path, fmt):
    target = tmp_path / f"d{fmt.suffixes[0]}"
    with OutputWriter(str(target), fmt, "EPSG:32617") as writer:
        writer.write(_records(PROJECTED))
    back = formats.read_detections(target)
    assert [(d.source, d.image_id, d.class_name, d.category_id, d.score, d.bbox) for d in back] \
        == [(r["source"], r["image_id"], r["class_name"], r["category_id"], r["score"],
             tuple(r["bbox"])) for r in PROJECTED]
    # COCO results record the category only; the others keep the model's class index
    assert [d.class_id for d in back] == ([None, None] if fmt is Coco else [0, 2])


def test_a_map_format_refuses_a_record_without_map_coordinates(tmp_path):
    with pytest.raises(QueryDetError, match="needs map coordinates; use --format coco, csv, "
                                            "ndjson or mot"):
        with OutputWriter(str(tmp_path / "d.geojson"), GeoJSON, None) as writer:
            writer.write(_records(PLAIN))
    assert list(tmp_path.iterdir()) == []  # aborted: nothing half-written


def test_a_failed_write_keeps_the_old_output(tmp_path):
    target = tmp_path / "d.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with OutputWriter(str(target), Csv, None) as writer:
            writer.write(_records(PLAIN))
            raise RuntimeError("the run failed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["d.csv"]


def test_stdout_takes_text_formats_only(capsys):
    with pytest.raises(QueryDetError, match="cannot be written to stdout"):
        with OutputWriter("-", GeoPackage, "EPSG:32617"):
            pass
    with OutputWriter("-", Ndjson, None) as writer:
        writer.write(_records(PLAIN))
    line = json.loads(capsys.readouterr().out)
    assert line["properties"]["class_name"] == 'person "a"' and line["geometry"] is None


def test_the_format_follows_the_option_else_the_suffix():
    assert formats.format_for("x.geojson", None) is GeoJSON
    assert formats.format_for("x.GPKG", None) is GeoPackage
    assert formats.format_for("x.jsonl", None) is Ndjson
    assert formats.format_for("x.json", None) is Coco
    assert formats.format_for("-", None) is Ndjson
    assert formats.format_for("x.txt", "csv") is Csv
    assert formats.format_for("x.txt", None) is Mot
    with pytest.raises(QueryDetError, match=r"from 'x.dat': use a suffix \(.geojson, .gpkg, "
                                            r".json, .csv, .ndjson, .jsonl, .txt\) or --format"):
        formats.format_for("x.dat", None)
    with pytest.raises(QueryDetError, match="'shp' is not one of geojson, gpkg, coco, csv, "
                                            "ndjson, mot"):
        formats.format_for("x.shp", "shp")


def test_choices_and_help_derive_from_the_list(monkeypatch):
    from querydet_cli.commands.shared import OutputFormat

    assert [f.value for f in OutputFormat] == [f.name for f in FORMATS]
    assert formats.suffix_help() == ".geojson .gpkg .json (COCO) .csv .ndjson .txt (MOT)"
    assert formats.map_free_choices() == "-o with .json (COCO), .csv, .ndjson or .txt (MOT)"

    class Shapefile(formats.Format):  # a new format is one class in the list
        name, suffixes, label, needs_crs = "shp", (".shp",), ".shp", True

    monkeypatch.setattr(formats, "FORMATS", (*FORMATS, Shapefile))
    assert formats.format_for("x.shp", None) is Shapefile
    assert formats.suffix_help(formats.FORMATS).endswith(".txt (MOT) .shp")


def test_view_reads_every_format_through_the_list(tmp_path):
    from querydet_cli.viewer.page import read_detections

    for fmt in (GeoJSON, Csv, Ndjson, Coco):
        target = tmp_path / f"d{fmt.suffixes[0]}"
        with OutputWriter(str(target), fmt, "EPSG:32617") as writer:
            writer.write(_records(PROJECTED))
        boxes = read_detections(target)
        assert [(b.class_name, b.bbox) for b in boxes] == [("car", (10.0, 20.5, 30.25, 50.0)),
                                                         ("tree, oak", (0.0, 0.0, 1.5, 2.0))]
    # GeoJSON written under .json by --format geojson is still read as GeoJSON
    renamed = tmp_path / "as.json"
    renamed.write_bytes((tmp_path / "d.geojson").read_bytes())
    assert len(read_detections(renamed)) == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
