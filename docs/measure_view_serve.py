"""The `querydet view --serve` figures in the README: tile latency per zoom and the server's
memory on a large GeoTIFF (written here by synthetic.write_big_raster unless given).

    python docs/measure_view_serve.py [RASTER] [--side 16384]

Starts `querydet view --serve --port 0` on 1000 generated boxes, asks for 12 random tiles per zoom
(3 at zoom 0) over HTTP, prints the median / max / first latency per zoom and the server's RSS.
"""

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from querydet_cli.training.synthetic import write_big_raster


def boxes(path: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as fh:
        for x, y, w, h, s in zip(*rng.uniform(0, side - 40, (2, n)), *rng.uniform(6, 40, (2, n)),
                                 rng.uniform(0.3, 1, n)):
            fh.write(json.dumps({"type": "Feature", "geometry": None, "properties": {
                "source": "r.tif", "class_name": "car", "score": round(float(s), 4),
                "bbox_px": [float(x), float(y), float(x + w), float(y + h)]}}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("raster", nargs="?")
    p.add_argument("--side", type=int, default=16384)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    raster = Path(a.raster) if a.raster else write_big_raster(tmp / "r.tif", a.side)
    import rasterio

    with rasterio.open(raster) as src:
        side = max(src.width, src.height)
    boxes(tmp / "b.ndjson", 1000, side)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "querydet_cli", "view", str(tmp / "b.ndjson"),
                             "--raster", str(raster), "--serve", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    url = re.search(r"http://127\.0\.0\.1:\d+", proc.stderr.readline())[0]
    print(f"start to serving {time.perf_counter() - t0:.2f} s")
    page = urllib.request.urlopen(url + "/").read().decode()
    top = json.loads(re.search(r'id="querydet-data">(.*?)</script>', page, re.S)[1])["sources"][0]["maxzoom"]
    random.seed(0)
    for z in [top, top - 1, top - 2, top - 3, top - 4, 0]:
        per = max(1, -(-side // (256 * 2 ** (top - z))))
        ts = []
        for _ in range(12 if z > 0 else 3):
            x, y = random.randrange(per), random.randrange(per)
            t = time.perf_counter()
            urllib.request.urlopen(f"{url}/tiles/0/{z}/{x}/{y}.png").read()
            ts.append(time.perf_counter() - t)
        print(f"zoom {z} (1 tile px = {2 ** (top - z)} raster px): median "
              f"{statistics.median(ts) * 1000:.0f} ms, max {max(ts) * 1000:.0f} ms, "
              f"first {ts[0] * 1000:.0f} ms")
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{proc.pid}/status").read_text())[1]) / 1024
    print(f"server RSS {rss:.0f} MB")
    proc.send_signal(2)
    proc.wait()


if __name__ == "__main__":
    main()
