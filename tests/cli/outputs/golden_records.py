"""The records every format's golden file holds (tests/cli/outputs/test_formats.py)."""

PROJECTED = [  # UTM 17N, as the NEON OSBS raster
    dict(source="scene.tif", image_id=1, class_id=0, class_name="car", category_id=1,
         score=0.98765, bbox=[10.0, 20.5, 30.25, 50.0], crs="EPSG:32617",
         geometry=[[403010.0, 3285020.0], [403030.25, 3285020.0], [403030.25, 3284990.0],
                   [403010.0, 3284990.0], [403010.0, 3285020.0]]),
    dict(source="scene.tif", image_id=1, class_id=2, class_name="tree, oak", category_id=7,
         score=0.3, bbox=[0.0, 0.0, 1.5, 2.0], crs="EPSG:32617",
         geometry=[[403000.0, 3285040.0], [403001.5, 3285040.0], [403001.5, 3285038.0],
                   [403000.0, 3285038.0], [403000.0, 3285040.0]]),
]
PLAIN = [
    dict(source="frames/0001.png", image_id=3, class_id=1, class_name='person "a"',
         category_id=2, score=0.5, bbox=[100.0, 200.0, 104.5, 209.0], crs=None, geometry=None),
]
