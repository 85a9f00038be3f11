"""`querydet view --serve`: the page and map tiles of each raster on 127.0.0.1.

Tiles are cut by rio-tiler's ImageReader in the raster's own pixels (its local tile pyramid: at the
deepest zoom one tile pixel is one raster pixel, each zoom above halves), so the boxes, drawn in
raster pixels, sit on them exactly. Each request reads one window (GDAL takes the raster's
overviews when it has them), so memory stays bounded whatever the raster's size. Zoomed-out tiles of
a raster without overviews come from one overview (at most 2048 pixels a side) that a background
thread reads once when the server starts, instead of reading the whole raster for every such
tile. `view --serve` holds GDAL's block cache to 64 MB (GDAL_CACHEMAX, unless set).
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from ..core.errors import QueryDetError

TILE = re.compile(r"^/tiles/(\d+)/(-?\d+)/(-?\d+)/(-?\d+)\.png$")
OVERVIEW_SIDE = 2048
MAX_BODY = 256 * 1024 * 1024  # bytes of one save (about two million labels)


class TileSource:
    """One raster's tiles as PNG bytes; one reader and a lock per raster (GDAL handles are not
    shared between threads)."""

    def __init__(self, path: str, bands: tuple[int, ...] | None = None) -> None:
        try:
            from rio_tiler.errors import NoOverviewWarning
            from rio_tiler.io.rasterio import ImageReader
        except ImportError:
            raise QueryDetError("view --serve needs rio-tiler: pip install 'querydet[view]'") \
                from None

        from ..reading.raster import RasterSource

        self.source = RasterSource(path, bands)  # bands, stretch, palette, alpha as detect reads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoOverviewWarning)
            self.reader = ImageReader(path)
        self.maxzoom = self.reader.maxzoom
        self.lock = threading.Lock()
        self.has_overviews = bool(self.source.src.overviews(1))
        self._overview: tuple[np.ndarray, float] | None = None
        self._overview_ready = threading.Event()
        if not self.has_overviews and self._overview_scale() > 1:
            threading.Thread(target=self._build_overview, daemon=True).start()
        else:
            self._overview_ready.set()

    def _build_overview(self) -> None:
        """One read of the whole raster at most 2048 px a side, on its own handle."""
        twin = self.source.reopen()
        try:
            rgb, factor = twin.overview(OVERVIEW_SIDE)
            valid = twin.overview_valid(rgb.shape[:2])
            self._overview = (np.dstack([rgb, np.where(valid, 255, 0).astype(np.uint8)]), factor)
        finally:
            twin.close()
            self._overview_ready.set()

    def png(self, z: int, x: int, y: int) -> bytes | None:
        """The tile's PNG (transparent where there is no data), None when outside the raster."""
        from PIL import Image

        scale = 2.0 ** (self.maxzoom - z)  # raster pixels per tile pixel
        side = 256 * scale
        if z > self.maxzoom or x < 0 or y < 0 or x * side >= self.source.width \
                or y * side >= self.source.height:
            return None
        if not self.has_overviews and scale >= self._overview_scale():
            self._overview_ready.wait()
        if self._overview is not None and scale >= self._overview_scale():
            rgba = self._from_overview(x, y, scale)
        else:
            with self.lock:
                rgba = self._read(x, y, z)
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, "PNG", compress_level=1)
        return buf.getvalue()

    def _read(self, x: int, y: int, z: int) -> np.ndarray:
        img = self.reader.tile(x, y, z, indexes=self.source.bands, resampling_method="bilinear")
        data = img.array.filled(0).astype(np.float32)
        valid = ~np.ma.getmaskarray(img.array).any(axis=0)
        return self._rgba(data, valid)

    def _rgba(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Raster values -> display RGBA as detect sees them; transparent where no data."""
        rgb = self.source.display(data)
        return np.dstack([rgb, np.where(valid, 255, 0).astype(np.uint8)])

    def _overview_scale(self) -> float:
        return max(1.0, max(self.source.width, self.source.height) / OVERVIEW_SIDE)

    def _from_overview(self, x: int, y: int, scale: float) -> np.ndarray:
        """A zoomed-out tile cut from the kept overview and resized to 256 px."""
        from PIL import Image

        rgba, factor = self._overview
        step = 256 * scale / factor  # overview pixels per tile
        x0, y0 = x * step, y * step
        h, w = rgba.shape[:2]
        crop = rgba[int(y0):min(h, int(np.ceil(y0 + step))), int(x0):min(w, int(np.ceil(x0 + step)))]
        out = np.zeros((256, 256, 4), np.uint8)
        if crop.size:
            size = (max(1, round(crop.shape[1] * 256 / step)), max(1, round(crop.shape[0] * 256 / step)))
            part = np.asarray(Image.fromarray(crop, "RGBA").resize(size, Image.BILINEAR))
            out[:min(256, part.shape[0]), :min(256, part.shape[1])] = part[:256, :256]
        return out

    def close(self) -> None:
        self.reader.close()
        self.source.close()


def serve(html: str, tiles: list[TileSource], port: int, announce=print, saver=None) -> None:
    """Serve the page at / and tiles at /tiles/<raster>/<z>/<x>/<y>.png until Ctrl-C; with a
    `saver` (editing.SaveEndpoint), the editing page's saves at POST /save."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if saver is None or self.path.split("?")[0] != "/save":
                return self._send(404, "text/plain", b"not found\n")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(411, {"error": "a save needs its Content-Length"})
            if not 0 <= length <= MAX_BODY:
                return self._json(413, {"error": "the save is too large"})
            body = self.rfile.read(length)
            code, answer = saver.handle(self.headers, body, self.server.server_address[1])
            if code != 200:
                print(f"querydet: save refused ({code}): {answer['error']}", file=sys.stderr)
            else:
                print(f"querydet: saved {answer['labels']} labels and {answer['areas']} reviewed "
                      f"areas to {answer['path']}", file=sys.stderr)
            return self._json(code, answer)

        def _json(self, code: int, answer: dict) -> None:
            self._send(code, "application/json", json.dumps(answer).encode("utf-8"))

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                return self._send(200, "text/html; charset=utf-8", html.encode("utf-8"))
            m = TILE.match(path)
            if not m or int(m[1]) >= len(tiles):
                return self._send(404, "text/plain", b"not found\n")
            try:
                body = tiles[int(m[1])].png(int(m[2]), int(m[3]), int(m[4]))
            except Exception as err:  # one bad tile must not stop the server
                print(f"querydet: tile {path}: {err}", file=sys.stderr)
                return self._send(500, "text/plain", b"tile failed\n")
            if body is None:
                return self._send(404, "text/plain", b"outside the raster\n")
            return self._send(200, "image/png", body)

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if kind == "image/png"
                             else "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet: no line per tile
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as err:
        raise QueryDetError(f"--port {port}: cannot listen on 127.0.0.1 ({err.strerror})") from None
    announce(f"querydet: serving http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for t in tiles:
            t.close()
