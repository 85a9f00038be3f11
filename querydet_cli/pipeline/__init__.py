"""The detect pipeline, in the order a raster goes through it: inputs (inputs.py), reading and
resampling (raster.py, gsd.py), planning (tiling.py, validity.py), producing (producer.py, tta.py;
ray_producer.py on Ray actors), merging (merge.py), the journal (journal.py, identity.py), and
the run that joins them into one output (detect.py), with its profile and overview images."""
