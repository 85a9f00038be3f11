import json
import subprocess
import sys

import pytest

from typer.testing import CliRunner

from querydet_cli.app import app
from querydet_cli.bench.heads import BenchOptions, run_bench
from querydet_cli.core.errors import QueryDetError

runner = CliRunner()


def test_bench_report_small():
    opts = BenchOptions(backbone="resnet18", image_size=128, batch=2, repeats=1,
                        query_density=0.05)
    report = run_bench(opts)
    modes = report["modes"]
    assert {"dense_hr", "csq_exact_torch", "csq_5x5_torch", "cq", "ccq",
            "retinanet_p3_p7"} <= set(modes)
    assert modes["dense_hr"]["speedup_vs_dense"] == 1.0
    dense = modes["dense_hr"]["time_s"]
    for name, entry in modes.items():
        assert entry["speedup_vs_dense"] == pytest.approx(dense / entry["time_s"])
        if name.startswith("csq_exact") or name in ("cq", "ccq"):
            assert entry["max_rel_err"] < 1e-4, name
            assert set(entry["max_rel_err_per_level"]) == {"P2", "P3"}
    assert modes["csq_5x5_torch"]["max_rel_err"] > 1e-4  # the paper's context is approximate
    assert 0.05 <= report["query_density_start_level"] < 0.5
    assert modes["csq_exact_torch"]["levels"]["P2"]["fraction_computed"] < 1.0


def test_bench_json_cli():
    result = runner.invoke(app, ["bench", "--backbone", "resnet18", "--image-size", "96",
                                 "--repeats", "1", "--backends", "torch", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "speedup_vs_dense" in report["modes"]["csq_exact_torch"]


def test_bench_rejects_bad_options():
    result = runner.invoke(app, ["bench", "--backends", "cuda-magic"])
    assert isinstance(result.exception, QueryDetError)
    result = runner.invoke(app, ["bench", "--paper-context", "4x4"])
    assert isinstance(result.exception, QueryDetError)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "querydet_cli", *args], capture_output=True,
                          text=True, timeout=120)


def _cli_each(commands):
    """Each command line in its own process, four at a time (each case has its own folders, so
    the "leaves nothing behind" checks cannot race); the results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: _cli(*map(str, args)), commands))


def test_user_errors_are_one_line_with_exit_2(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    proc = _cli("bench", "--weights", str(junk), "--repeats", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("querydet: error: cannot read checkpoint")
    assert "Traceback" not in proc.stderr
    proc = _cli("train", "--dataset", "imagenet", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("querydet: error: Invalid value for '--dataset': 'imagenet' "
                                   "is not one of 'synthetic', 'coco', 'visdrone'.")


def test_cli_conventions_version_configs_devices(tmp_path):
    assert _cli("--version").stdout.startswith("querydet ")
    listing = _cli("configs").stdout.splitlines()
    assert any(line.split()[:3] == ["querydet_r50_visdrone", "retinanet", "resnet50"]
               for line in listing)
    cases = ((["--device", "gpu"], "'gpu' is not one of 'auto', 'cpu', 'cuda'"),
             (["--mode", "fast"], "'fast' is not one of"),
             (["--context", "13x13"], "'13x13' is not one of"),
             (["--merge-threshold", "-1"], "'--merge-threshold'"),
             (["--tile-size", "0"], "'--tile-size'"),
             (["--overlap", "1024"], "--overlap (1024) above 512 needs a --tile-size"),
             (["--tile-size", "1024", "--overlap", "1024"], "--overlap (1024) must be at most half"),
             (["--overlap", "-1"], "'--overlap'"),
             (["--bands", "0"], "--bands: one band"),
             (["--bands", "1,2"], "--bands: one band"),
             (["--format", "shp"], "'shp' is not one of"))
    cases = [(tmp_path / f"case{i}", args, needle) for i, (args, needle) in enumerate(cases)]
    for where, _, _ in cases:
        where.mkdir()
    procs = _cli_each([["detect", where / "x.tif", "-o", where / "o.geojson", *args]
                       for where, args, _ in cases])
    for (where, args, needle), proc in zip(cases, procs):
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("querydet: error: ") and needle in lines[0]
        assert not list(where.iterdir())  # a usage error leaves nothing behind
        where.rmdir()
    (tmp_path / "adir").mkdir()
    proc = _cli("detect", str(tmp_path / "x.tif"), "-o", str(tmp_path / "adir"), "--format",
                "geojson")
    assert proc.returncode == 2 and "is a directory" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["adir"]


def test_resolve_device():
    import pytest
    import torch

    from querydet_cli.runtimes.loading import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(QueryDetError, match="not one of"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(QueryDetError, match="no CUDA device is available"):
            resolve_device("cuda")


def test_new_options_reject_bad_values_with_one_line_and_leave_nothing(tmp_path):
    import geopandas as gpd
    from rasterio.transform import Affine
    from shapely.geometry import box

    from tests.cli.oracle import paint, write_tif

    tif = write_tif(tmp_path / "a.tif", paint(64, 64, []), Affine(1, 0, 0, 0, -1, 0))
    gpd.GeoDataFrame({"label": ["x"]}, geometry=[box(1, -20, 10, -2)]).to_file(tmp_path / "nocrs.gpkg")
    gpd.GeoDataFrame({"label": ["x"]}, geometry=[box(1, -20, 10, -2)],
                     crs="EPSG:32633").to_file(tmp_path / "l.gpkg")

    def cases(work):  # each case writes (if it wrongly did) into its own folder `work`
        return [
            (["tile", tif, "--labels", tmp_path / "missing.gpkg", "--out", work / "c"], "file not found"),
            (["tile", tif, "--labels", tmp_path / "nocrs.gpkg", "--out", work / "c"], "has no CRS"),
            (["tile", tif, "--labels", tmp_path / "l.gpkg", "--label-field", "species", "--out",
              work / "c"], "'species' is not a field"),
            (["tile", tif, "--labels", tmp_path / "l.gpkg", "--bounds", "1,2,3", "--out", work / "c"],
             "--bounds"),
            (["tile", tif, "--labels", tmp_path / "l.gpkg", "--classes", ",", "--out", work / "c"],
             "--classes"),
            (["tile", "--labels", tmp_path / "l.gpkg", "--out", work / "c"], "rasters are given"),
            (["train", "--init", tmp_path / "none.pt", "--out", work / "r"], "checkpoint not found"),
            (["detect", tif, "-o", "-", "--json"], "--json prints a summary"),
            (["detect", tif, "-o", work / "o.geojson", "--gpus-per-worker", "1"], "goes with --ray"),
            (["detect", tif, "-o", work / "o.json", "--coco-gt", tmp_path / "none.json"],
             "--coco-gt: file not found"),
            (["bench-detect", "--peer", "yolo", "--sizes", ""], "--peer"),
            (["bench-detect", "--scene", "city", "--sizes", ""], "--scene"),
            (["bench-detect", "--truth", tmp_path / "none.json", "--sizes", ""], "--truth"),
            (["bench", "--precision", "fp8"], "--precision: 'fp8'"),
        ]
    works = [tmp_path / f"work{i}" for i in range(len(cases(tmp_path)))]
    for work in works:
        work.mkdir()
    each = [cases(work)[i] for i, work in enumerate(works)]
    for (args, needle), proc, work in zip(each, _cli_each([args for args, _ in each]), works):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("querydet: error: ") and needle in lines[0], \
            (args, proc.stderr)
        assert list(work.iterdir()) == [], args  # a usage error leaves nothing behind


def test_help_texts_show_square_brackets_as_written():
    """Typer's help goes through rich markup, where `querydet[ray]` would print as `querydet`:
    every bracket in an option's help must be escaped, and the escaped ones show up whole."""
    import re

    import typer

    commands = typer.main.get_command(app).commands
    shown = 0
    for name, command in commands.items():
        for param in command.params:
            text = getattr(param, "help", None) or ""
            assert not re.search(r"(?<!\\)\[[A-Za-z_/ ]+\]", text), f"{name} {param.name}: {text}"
            for extra in re.findall(r"'querydet\\\[(\w+)\]'", text):
                result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"},
                                       terminal_width=400)
                assert f"'querydet[{extra}]'" in result.output, (name, extra)
                shown += 1
    assert shown >= 2  # detect --ray, bench-detect --peer
