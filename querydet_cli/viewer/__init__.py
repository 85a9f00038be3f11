"""`querydet view`: the offline page of detections over their imagery (page.py, static/) and the
local tile server of `view --serve` (server.py)."""
