"""Training from labels: datasets (COCO, VisDrone, synthetic), GIS labels (vector_labels.py),
chips (chips.py), augmentation, the training loop (train.py), evaluation and its metrics."""
