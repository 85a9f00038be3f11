"""querydet: the command line and the Python API around `querydet_models`.

`from querydet_cli import Detector` loads the API (and torch) only when it is asked for, so the
command line's `--help` stays fast.
"""

import os

# GDAL caches decoded blocks up to 5% of RAM by default, so a streamed raster would fill the
# cache and memory would grow with the raster. Each window is read about once; a small cache
# (enough for the blocks shared by overlapping tile rows) keeps memory bounded. Must be set
# before GDAL's first read; a user's own GDAL_CACHEMAX wins.
os.environ.setdefault("GDAL_CACHEMAX", "64")

__all__ = ["Detector"]


def __getattr__(name: str):
    if name == "Detector":
        from .api import Detector

        return Detector
    raise AttributeError(f"module 'querydet_cli' has no attribute {name!r}")
