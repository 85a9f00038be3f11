import json
import statistics
from pathlib import Path
from dataclasses import replace

import pytest
import rasterio
import torch

from querydet_models.checkpoint import save_checkpoint
from querydet_models.config import ModelConfig
from querydet_models.detectors.querydet import build_querydet
from querydet_cli.bench.detect import run
from querydet_cli.training.synthetic import write_big_raster
from querydet_cli.core.config import Config


def test_big_raster_is_written_block_by_block(tmp_path):
    path = write_big_raster(tmp_path / "r.tif", 700, block=256)
    with rasterio.open(path) as src:
        assert (src.width, src.height, src.count) == (700, 700, 3)
        assert src.crs is not None and src.profile["tiled"]


def test_memory_and_throughput_report(tmp_path):
    cfg = replace(Config(), model=ModelConfig(backbone="resnet18", fpn_channels=16, head_convs=2,
                                              num_classes=3))
    torch.manual_seed(0)
    weights = tmp_path / "m.pt"
    save_checkpoint(weights, build_querydet(cfg.model, cfg.inference), cfg.to_dict(),
                    ["a", "b", "c"])
    raster = write_big_raster(tmp_path / "t.tif", 256, block=128)
    report = run([256, 384], str(weights), tmp_path / "w", str(raster), "cpu", 256, 32, 1)
    assert [r["size"] for r in report["memory"]] == [256, 384]
    assert all(r["peak_rss_mib"] > 50 for r in report["memory"])
    assert [r["megapixels"] for r in report["memory"]] == [256 * 256 / 1e6, 384 * 384 / 1e6]
    rss = [r["peak_rss_mib"] for r in report["memory"]]
    assert report["rss_ratio"] == pytest.approx(max(rss) / min(rss))
    t = report["throughput"]
    assert t["csq_speedup"] == pytest.approx(t["csq"]["megapixels_per_s"]
                                             / t["dense"]["megapixels_per_s"])
    assert {t["csq"]["precision"], t["dense"]["precision"]} == {"fp32"}


def test_survey_raster_has_a_nodata_collar_and_truth_inside(tmp_path):
    import json

    import numpy as np

    from querydet_cli.training.synthetic import write_survey_raster

    path = write_survey_raster(tmp_path / "s.tif", 1024, tmp_path / "s.json", block=256,
                               busy_fraction=0.5)
    with rasterio.open(path) as src:
        data = src.read(1)
        assert src.nodata == 0
    collar = (data == 0).mean()
    assert 0.2 < collar < 0.7  # a rotated footprint inside a nodata collar
    truth = json.loads((tmp_path / "s.json").read_text())
    assert truth["annotations"]
    for a in truth["annotations"]:
        x, y, w, h = a["bbox"]
        assert data[int(y + h / 2), int(x + w / 2)] != 0  # centred on valid pixels


def test_peer_bench_runs_sahi_with_the_same_weights(tmp_path):
    import pytest

    pytest.importorskip("sahi")
    from querydet_cli.bench.detect import run_peer_bench

    cfg = replace(Config(), model=ModelConfig(backbone="resnet18", fpn_channels=16, head_convs=2,
                                              num_classes=5))
    torch.manual_seed(0)
    weights = tmp_path / "m.pt"
    save_checkpoint(weights, build_querydet(cfg.model, cfg.inference), cfg.to_dict(),
                    ["car", "truck", "person", "tree", "building"])
    truth = tmp_path / "t.json"
    raster = write_big_raster(tmp_path / "t.tif", 512, block=256, truth=truth)
    report = run_peer_bench(str(raster), str(weights), "cpu", 256, 32, 2, rounds=1, truth=truth,
                            score_threshold=0.0, sahi_plan=(256, 32))
    rows = report["rows"]
    assert set(rows) == {"querydet", "querydet_fp32", "sahi_fp32"}
    for row in rows.values():
        assert row["wall_s"] == pytest.approx(statistics.median(row["wall_s_all"]), abs=0.01)
        assert 0 <= row["AP"] <= 1
        assert 0 <= row["seam_duplicates"] <= row["duplicates"] and row["seam_objects"] > 0
    assert report["speedup_fp32_vs_sahi"] == pytest.approx(rows["sahi_fp32"]["wall_s"]
                                                           / rows["querydet_fp32"]["wall_s"])


def test_duplicate_count_counts_extra_matches_of_one_object(tmp_path):
    from querydet_cli.bench.detect import duplicate_count

    truth = tmp_path / "t.json"
    truth.write_text(json.dumps({"annotations": [
        {"bbox": [0, 0, 10, 10], "category_id": 7}, {"bbox": [100, 100, 10, 10], "category_id": 7},
        {"bbox": [200, 200, 10, 10], "category_id": 9}]}))

    def det(box, cls=0):
        return {"bbox": box, "class_id": cls, "score": 0.9}

    ids = [7, 9]
    none = duplicate_count(truth, [det([0, 0, 10, 10]), det([100, 100, 110, 110])], ids)
    assert none == {"duplicates": 0, "seam_objects": 0, "seam_duplicates": 0}
    # a second view of the first object (IoU 0.81), a fragment (IoU 0.3: not a duplicate), and
    # another class's box over it (not a duplicate)
    dets = [det([0, 0, 10, 10]), det([1, 1, 10, 10]), det([0, 0, 3, 10]), det([0, 0, 10, 10], 1),
            det([100, 100, 110, 110]), det([100, 100, 110, 110]), det([101, 100, 110, 110])]
    assert duplicate_count(truth, dets, ids)["duplicates"] == 3
    # two tiles meeting at x = 104..105: the object at 100..110 is cut by both, the first not
    tiles = [(0, 0, 105, 300), (104, 0, 300, 300)]
    assert duplicate_count(truth, dets, ids, tiles) == {"duplicates": 3, "seam_objects": 1,
                                                        "seam_duplicates": 2}


def test_whole_process_rows_time_each_side_in_its_own_process(tmp_path):
    import pytest

    pytest.importorskip("sahi")
    from querydet_cli.bench.whole import format_whole, run_whole_process
    from querydet_cli.core.resources import sample_model

    truth = tmp_path / "t.json"
    raster = write_big_raster(tmp_path / "t.tif", 512, block=256, truth=truth)
    report = run_whole_process(str(raster), str(sample_model()), truth, rounds=1,
                               rows=("querydet", "sahi_fp32"))
    rows = report["rows"]
    assert set(rows) == {"querydet", "sahi_fp32"}
    for row in rows.values():
        assert row["wall_s"] > 1.0  # a whole process: python, torch and the model load inside
        assert 0.3 < row["AP50"] <= 1.0 and row["detections"] > 0
    assert report["ratios"]["defaults"] == pytest.approx(
        rows["sahi_fp32"]["wall_s"] / rows["querydet"]["wall_s"])
    assert "SAHI / querydet, defaults" in format_whole(report)


def test_whole_process_takes_the_tile_plan_for_querydet_rows_only(tmp_path, monkeypatch):
    import subprocess

    from typer.testing import CliRunner

    from querydet_cli.bench import whole as bench_whole
    from querydet_cli.app import app
    from querydet_cli.core.resources import sample_scene

    ran = []

    def fake_run(cmd, **kwargs):  # record each side's command; write an empty result
        ran.append(cmd)
        out = Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else Path(cmd[5])
        out.write_text("" if "-o" in cmd else "[]")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench_whole.subprocess, "run", fake_run)
    result = CliRunner().invoke(app, ["bench-detect", "--sizes", "", "--peer", "sahi",
                                      "--whole-process", "--raster", str(sample_scene()),
                                      "--rounds", "1", "--tile-size", "512", "--overlap", "64",
                                      "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    ours = [c for c in ran if "detect" in c]
    peers = [c for c in ran if "querydet_cli.bench.sahi_peer" in c]
    assert len(ours) == 2 and len(peers) == 2
    for cmd in ours:
        assert cmd[cmd.index("--tile-size") + 1] == "512" and cmd[cmd.index("--overlap") + 1] == "64"
    assert not any("--tile-size" in c for c in peers)
    # both sides run on the device the bench resolved (here the CPU)
    assert all(c[c.index("--device") + 1] == "cpu" for c in ran)


def test_whole_process_runs_both_sides_on_the_asked_device(tmp_path):
    from querydet_cli.bench.whole import _command

    for side in ("querydet", "sahi"):
        cmd = _command(side, "bf16", "r.tif", "w.pt", tmp_path / "o", [], "cuda")
        assert cmd[cmd.index("--device") + 1] == "cuda"
        assert cmd[cmd.index("--precision") + 1] == "bf16"


def test_peer_script_takes_a_device():
    from querydet_cli.bench import sahi_peer

    with pytest.raises(SystemExit):  # argparse: an unknown device is a usage error
        sahi_peer.main(["r.tif", "w.pt", "o.json", "--device", "tpu"])
