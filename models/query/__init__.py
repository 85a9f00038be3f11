"""The cascade sparse query (the paper's section 3): query targets (Eq. 2-3) and the inference
that runs the fine levels only where the coarse ones point (query_infer.py)."""
