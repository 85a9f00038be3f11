"""What a run hands out: the detection record (records.py), the output formats as one list
(formats.py: write and read each), atomic writing (writers.py), pixel boxes on the map
(geometry.py) and drawings of boxes and heatmaps (drawing.py)."""
