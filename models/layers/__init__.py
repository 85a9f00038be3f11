"""The network's parts: backbones, FPN, heads, anchors, box coding, matching, losses, precision
and the sparse convolution that the query runs on."""
