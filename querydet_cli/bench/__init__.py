"""Measurements, apart from the product: the heads (heads.py: dense, CSQ, the baseline),
whole detect runs against SAHI (detect.py, whole.py, sahi_peer.py), ground resolutions (gsd.py)
and runtimes (runtime.py)."""
