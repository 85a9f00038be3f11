from dataclasses import replace

import rasterio
import torch

from querydet_models.checkpoint import save_checkpoint
from querydet_models.config import ModelConfig
from querydet_models.querydet import build_querydet
from querydet_cli.bench_detect import run, write_big_raster
from querydet_cli.config import Config


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
    assert report["rss_ratio"] >= 1.0
    t = report["throughput"]
    assert t["csq"]["megapixels_per_s"] > 0 and t["dense"]["megapixels_per_s"] > 0
