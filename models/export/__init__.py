"""The export graphs: the model as ONNX-traceable pieces with the sparse query kept, and the
inference that runs them (graph_infer.py)."""
