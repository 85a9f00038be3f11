"""Reading the inputs: paths, folders, globs and stdin into a list (inputs.py), rasters and
images read window by window with their bands, nodata and alpha (raster.py), at the model's
ground resolution (gsd.py)."""
