"""What runs a model: loading a checkpoint or an export for a device (loading.py), the
onnxruntime and OpenVINO backends (runtime.py), exporting (export.py) and int8 calibration
(quantize.py)."""
