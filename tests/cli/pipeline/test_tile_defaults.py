"""The tile size left to the device: 2304 px on the CPU, 1024 px on CUDA; a given one is kept,
and every door (CLI, API, run_detect) plans the same tiles from it."""

from types import SimpleNamespace

import numpy as np
import torch

from querydet_cli.pipeline.options import DetectOptions, default_tile_size
from querydet_cli.pipeline.producer import InputPlanner


def test_default_tile_size_by_device():
    assert default_tile_size(torch.device("cpu")) == 2304
    assert default_tile_size(torch.device("cuda")) == 1024
    assert DetectOptions().resolved(torch.device("cpu")).tile_size == 2304
    assert DetectOptions().resolved(torch.device("cuda")).tile_size == 1024
    given = DetectOptions(tile_size=512, batch_size=2)
    assert given.resolved(torch.device("cpu")) is given  # applied once: resolved stays as is
    assert DetectOptions(save_vis="v").resolved(torch.device("cpu")).save_vis == "v"
    assert DetectOptions(tile_size=512).resolved(torch.device("cpu")).tile_size == 512
    assert DetectOptions().resolved(torch.device("cpu")).batch_size == 1
    assert DetectOptions().resolved(torch.device("cuda")).batch_size == 4


def test_an_8192_raster_is_16_tiles_on_the_cpu_and_81_on_cuda():
    """The plan measured: 2304 px tiles cover 8192^2 with 16 tiles of 2144 (pixels computed
    1.10 times), CUDA's 1024 px tiles with 81 of 1024 (1.27 times)."""
    info = SimpleNamespace(width=8192, height=8192)
    for device, count, side in (("cpu", 16, 2144), ("cuda", 81, 1024)):
        opts = DetectOptions().resolved(torch.device(device))
        tiles = InputPlanner(None, 32, opts).plan(info)
        assert len(tiles) == count and {t.width for t in tiles} == {side}
        computed = sum(t.width * t.height for t in tiles) / 8192**2
        assert computed < 1.11 if device == "cpu" else computed > 1.26


def test_the_api_plans_the_default_tiles(monkeypatch):
    """Detector.detect on the CPU plans 2304 px tiles unless told otherwise."""
    from querydet_cli.api import Detector

    seen = []
    real_plan = InputPlanner.plan

    def plan(self, info):
        seen.append(self.opts.tile_size)
        return real_plan(self, info)

    monkeypatch.setattr(InputPlanner, "plan", plan)
    detector = Detector.load(device="cpu")
    image = np.zeros((96, 96, 3), np.uint8)
    detector.detect(image)
    detector.detect(image, tile_size=512)
    assert seen == [2304, 512]


def test_an_overlap_the_default_tile_cannot_hold_is_refused_by_detect_and_bench(tmp_path):
    """Without --tile-size, the smallest device default (1024) bounds --overlap: one line, exit
    2, nothing created, in detect and bench-detect alike."""
    from tests.cli.commands.test_app import _cli_each

    work = tmp_path / "w"
    procs = _cli_each([["detect", tmp_path / "x.tif", "-o", work / "o.geojson", "--overlap", "600"],
                       ["bench-detect", "--sizes", "", "--workdir", work, "--overlap", "600"]])
    for proc in procs:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == ("querydet: error: --overlap (600) above 512 needs a "
                                       "--tile-size of at least twice it (the default tile is "
                                       "1024 px on CUDA)")
    assert not work.exists()
