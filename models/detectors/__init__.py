"""The detector families: the FPN detector with its query head (RetinaNet, FCOS and Faster R-CNN
hosts), their postprocess, the staged inference pass and `build_querydet`."""
