"""The producer (producer.py): pixels in, per-tile detections out; only a tile's data window is
computed, and its boxes and heatmap land where its pixels are."""

import numpy as np
import torch

from querydet_cli.pipeline.detect import DetectOptions, run_detect

from tests.cli.pipeline.test_detect import CPU, _sample_run


def test_data_window_is_the_aligned_rectangle_around_valid_pixels():
    from querydet_cli.pipeline.producer import data_window

    valid = np.zeros((100, 90), bool)
    valid[37:41, 50:52] = True
    assert data_window(valid) == (50, 37, 52, 41)
    assert data_window(valid, 32) == (32, 32, 64, 64)  # start down, size up to multiples of 32
    valid[99, 89] = True
    assert data_window(valid, 32) == (32, 32, 90, 100)  # clipped to the tile
    assert data_window(np.zeros((100, 90), bool), 32) == (0, 0, 90, 100)


def test_a_nodata_collar_is_not_computed_and_boxes_stay_in_place(tmp_path):
    """Tiles are cropped to the rectangle around their data before the network: on a raster
    whose data is a window inside a nodata collar, fewer pixels are computed, and every object
    (on seams and tile corners too) is still found once with its exact box."""
    import torch
    from rasterio.transform import Affine

    from querydet_cli.core.config import Config
    from querydet_cli.pipeline.detect import DetectOptions, run_detect

    from tests.cli.oracle import OracleModel, paint, read_ndjson, write_tif

    objects = [(150, 60, 170, 75), (205, 100, 230, 120), (300, 200, 318, 230), (110, 90, 130, 104),
               (190, 200, 230, 226), (350, 120, 372, 140), (270, 265, 300, 282)]
    data = paint(416, 416, objects)
    collar = np.ones((416, 416), bool)
    collar[45:300, 101:390] = False  # data only here
    data[:, collar] = 255  # nodata in every band
    path = write_tif(tmp_path / "collar.tif", data, Affine(1, 0, 0, 0, -1, 0), nodata=255)
    out = tmp_path / "o.ndjson"
    summary = run_detect(OracleModel(), Config(), [str(path)], str(out), "ndjson",
                         DetectOptions(tile_size=128, overlap=32), torch.device("cpu"))
    found = sorted(tuple(r["bbox"]) for r in read_ndjson(out))
    assert found == sorted(tuple(float(v) for v in o) for o in objects)
    assert summary.profile["computed_pixel_share"] < 0.8


def test_a_cropped_tiles_heatmap_lands_where_its_pixels_are():
    from querydet_cli.pipeline.overview import heat_in_tile as _heat_in_tile

    heat = np.ones((6, 6), np.float32)  # stride 16 over a 96 x 96 crop
    out = _heat_in_tile(heat, (96, 96), (64, 32, 160, 128), 256, 256)
    assert out.shape == (16, 16)
    expected = np.zeros((16, 16), np.float32)
    expected[2:8, 4:10] = 1
    assert (out == expected).all()


def test_a_run_passes_its_precision_per_call_and_leaves_the_model_as_it_was(tmp_path):
    from querydet_cli.core.resources import sample_model, sample_scene
    from querydet_cli.runtimes.loading import load_model

    model, cfg = load_model(sample_model(), "cpu")
    before = model.precision
    other = "fp32" if before != "fp32" else "bf16"
    summary = run_detect(model, cfg, [str(sample_scene())], str(tmp_path / "o.ndjson"), "ndjson",
                         DetectOptions(precision=other), CPU)
    assert summary.precision == other and model.precision == before


def test_two_workers_give_the_same_bytes_and_leave_torch_threads_as_they_were(tmp_path):
    """Tiles computed two at once (the CPU default) come back in tile order with the very
    values of one worker: 25 tiles of the sample scene, batches of one and of two."""
    from querydet_cli.core.resources import sample_model
    from querydet_cli.pipeline.producer import TileProducer
    from querydet_cli.runtimes.loading import load_model

    model, cfg = load_model(sample_model(), "cpu")
    threads = torch.get_num_threads()
    for batch in (1, 2):
        one = _sample_run(tmp_path, f"one{batch}", model, cfg, workers=1, batch_size=batch)
        two = _sample_run(tmp_path, f"two{batch}", model, cfg, workers=2, threads=1,
                          batch_size=batch)
        assert one == two and one.count(b"\n") > 20
    assert torch.get_num_threads() == threads
    producer = TileProducer(model, cfg, DetectOptions(workers=3, profile=True).resolved(CPU), CPU)
    assert producer.workers == 1  # --profile: stage times that add up need one worker


def test_several_readers_deliver_the_tiles_in_plan_order_as_one_does(tmp_path, monkeypatch):
    """Windows decoded by three threads, each on its own handle, arrive in plan order with the
    pixels one reader gives (uint8 for an 8-bit raster, scaled on the model's device to the
    same float32 the reader used to make), and a failing read still ends the queue."""
    import queue
    import threading

    from querydet_cli.pipeline.producer import Profile, _reader, as_model_input
    from querydet_cli.pipeline.tiling import make_tiles
    from querydet_cli.reading.raster import RasterSource
    from querydet_cli.core.resources import sample_scene

    def read_all(src, tiles, readers):
        q: queue.Queue = queue.Queue()
        _reader(src, tiles, q, threading.Event(), Profile(), readers)
        items = []
        while (item := q.get()) is not None:
            assert not isinstance(item, Exception), item
            items.append(item)
        return items

    with RasterSource(str(sample_scene())) as src:
        tiles = make_tiles(src.width, src.height, 200, 40)
        one, three = read_all(src, tiles, 1), read_all(src, tiles, 3)
        assert [t for t, _, _ in three] == [t for t, _, _ in one] == tiles
        for (_, a, va), (_, b, vb) in zip(one, three):
            assert a.dtype == np.uint8 and np.array_equal(a, b) and np.array_equal(va, vb)
        t = tiles[5]
        floats, _ = src.read(t.x, t.y, t.width, t.height)
        scaled = as_model_input(one[5][1], torch.device("cpu"))
        assert scaled.dtype == torch.float32 and torch.equal(scaled, torch.from_numpy(floats))
    real = RasterSource.read

    def failing(self, x, y, width, height, keep_uint8=False):  # each handle reads its own file
        if (x, y) == (tiles[7].x, tiles[7].y):
            raise OSError("disk gone")
        return real(self, x, y, width, height, keep_uint8)

    monkeypatch.setattr(RasterSource, "read", failing)  # a read that fails on the eighth tile
    with RasterSource(str(sample_scene())) as src:
        q: queue.Queue = queue.Queue()
        _reader(src, tiles, q, threading.Event(), Profile(), 3)
        got = []
        while not isinstance(item := q.get(), Exception):
            assert item is not None  # the queue never ends as if all were read
            got.append(item)
        assert str(item) == "disk gone" and [t for t, _, _ in got] == tiles[:len(got)]
