"""querydet command line: files, CRSs and people around the `models` package."""

import os

# GDAL caches decoded blocks up to 5% of RAM by default, so a streamed raster would fill the
# cache and memory would grow with the raster. Each window is read about once; a small cache
# (enough for the blocks shared by overlapping tile rows) keeps memory bounded. Must be set
# before GDAL's first read; a user's own GDAL_CACHEMAX wins.
os.environ.setdefault("GDAL_CACHEMAX", "64")
