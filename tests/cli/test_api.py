"""The Python API: the CLI's pipeline on paths, open datasets and numpy arrays."""

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from querydet_cli import Detector
from querydet_cli.reading.arrays import channels_first
from querydet_cli.core.config import Config
from querydet_cli.core.errors import QueryDetError
from tests.cli.oracle import OracleModel, paint, write_tif

ROOT = Path(__file__).resolve().parents[2]
# objects across the borders of 128 px tiles overlapping by 32 (borders at 96..128, 192..224)
OBJECTS = [(10, 10, 30, 25), (80, 40, 150, 60), (85, 80, 140, 140), (250, 100, 299, 130)]
EXPECTED = sorted(tuple(float(v) for v in o) for o in OBJECTS)
TRANSFORM = Affine(0.5, 0, 1000, 0, -0.5, 2000)


def _detector():
    return Detector.from_model(OracleModel(), Config(), tile_size=128, overlap=32, batch_size=3)


def _boxes(gdf):
    return sorted(tuple(row) for row in gdf[["x1", "y1", "x2", "y2"]].itertuples(index=False))


def test_path_gives_a_georeferenced_frame_with_merged_boxes(tmp_path):
    path = write_tif(tmp_path / "a.tif", paint(300, 260, OBJECTS), TRANSFORM)
    gdf = _detector().detect(path)
    assert _boxes(gdf) == EXPECTED
    assert gdf.crs.to_epsg() == 32633
    assert list(gdf.columns) == ["class_id", "class_name", "score", "x1", "y1", "x2", "y2",
                                 "geometry"]
    first = gdf.iloc[0]
    x1, y1 = TRANSFORM @ (first.x1, first.y1)
    x2, y2 = TRANSFORM @ (first.x2, first.y2)
    assert first.geometry.bounds == pytest.approx((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))


def test_open_dataset_is_read_and_left_open(tmp_path):
    path = write_tif(tmp_path / "a.tif", paint(300, 260, OBJECTS), TRANSFORM)
    with rasterio.open(path) as ds:
        gdf = _detector().detect(ds)
        assert not ds.closed
        ds.read(1, window=((0, 1), (0, 1)))
    assert _boxes(gdf) == EXPECTED


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_numpy_arrays_in_either_layout(layout):
    data = paint(300, 260, OBJECTS)
    array = data if layout == "CHW" else data.transpose(1, 2, 0).copy()
    gdf = _detector().detect(array)
    assert _boxes(gdf) == EXPECTED
    assert gdf.crs is None
    # pixel geometry when the array has no transform
    assert gdf.geometry.iloc[0].bounds == tuple(gdf.iloc[0][["x1", "y1", "x2", "y2"]])


def test_numpy_array_with_transform_and_crs_is_georeferenced():
    gdf = _detector().detect(paint(300, 260, OBJECTS), transform=TRANSFORM, crs="EPSG:32633")
    assert _boxes(gdf) == EXPECTED and gdf.crs.to_epsg() == 32633


def test_alpha_channel_is_nodata():
    data = paint(300, 260, OBJECTS)
    alpha = np.full((1, 260, 300), 255, np.uint8)
    alpha[:, :, :60] = 0  # hides the first object
    gdf = _detector().detect(np.concatenate([data, alpha]))
    assert _boxes(gdf) == EXPECTED[1:]


def test_per_call_options_and_bad_inputs(tmp_path):
    det = _detector()
    assert _boxes(det.detect(paint(300, 260, OBJECTS), tile_size=512, overlap=0)) == EXPECTED
    assert det.options.tile_size == 128  # a per-call option does not stick
    with pytest.raises(QueryDetError, match="unknown option 'tile'"):
        det.detect(paint(300, 260, OBJECTS), tile=5)
    with pytest.raises(QueryDetError, match="expected"):
        det.detect(np.zeros((5, 5, 5, 5), np.uint8))
    with pytest.raises(QueryDetError, match="file not found"):
        det.detect(tmp_path / "missing.tif")
    with pytest.raises(QueryDetError, match="cannot detect on a list"):
        det.detect([1, 2, 3])
    with pytest.raises(QueryDetError, match="overlap"):
        det.detect(paint(300, 260, OBJECTS), overlap=128)
    assert channels_first(np.zeros((7, 9), np.uint8)).shape == (1, 7, 9)


def test_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's Python example, verbatim, with the bundled sample model and scene."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["example"])
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    gdf = scope["gdf"]
    assert len(gdf) > 10 and gdf.crs.to_epsg() == 32633
    assert set(gdf.class_name) <= set(scope["detector"].class_names)
