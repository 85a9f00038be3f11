"""`bench-detect --peer sahi --whole-process`: each side a fresh process, timed as `time` would.

querydet is `querydet detect RASTER -o OUT.ndjson` at its defaults and at --precision fp32; SAHI is
`python -m querydet_cli.bench.sahi_peer` (a user's SAHI script: the same checkpoint loaded by querydet's
loader, `get_sliced_prediction`, 1024 px slices with 128 overlap, GREEDYNMM / IoS 0.5 at 0.3) in
fp32 and with the same bf16 model. Imports, model load, reading and writing are all inside each
figure. Rows run interleaved, `rounds` times; the medians are reported, with AP and seam
duplicates of the first round against the raster's ground truth.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = {  # name: (side, precision)
    "querydet": ("querydet", None),
    "querydet_fp32": ("querydet", "fp32"),
    "sahi_fp32": ("sahi", "fp32"),
    "sahi_bf16": ("sahi", "bf16"),
}


def _command(side: str, precision: str | None, raster: str, weights: str, out: Path,
             detect_args: list[str], device: str) -> list[str]:
    """One row's command line; both sides on `device` (cpu or cuda)."""
    if side == "querydet":
        cmd = [sys.executable, "-m", "querydet_cli", "detect", raster, "-o", str(out), "--quiet",
               "--weights", weights, "--device", device, *detect_args]
        return cmd + (["--precision", precision] if precision else [])
    return [sys.executable, "-m", "querydet_cli.bench.sahi_peer", raster, weights, str(out),
            "--precision", precision or "fp32", "--device", device]


def _read(side: str, out: Path) -> list[dict[str, Any]]:
    if side == "sahi":
        return json.loads(out.read_text())
    feats = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return [{"bbox": f["properties"]["bbox_px"], "score": f["properties"]["score"],
             "class_id": f["properties"]["class_id"]} for f in feats]


def run_whole_process(raster: str, weights: str, truth: Path | None, rounds: int,
                      detect_args: list[str] | None = None,
                      rows: tuple[str, ...] = tuple(ROWS), device: str = "cpu") -> dict[str, Any]:
    """Median whole-process seconds per row, AP and duplicates, and the ratios against SAHI."""
    from ..runtimes.loading import load_model

    _, cfg = load_model(weights, "cpu")
    found: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in rows:
                side, precision = ROWS[name]
                out = Path(tmp) / f"{name}.{'json' if side == 'sahi' else 'ndjson'}"
                cmd = _command(side, precision, raster, weights, out, detect_args or [], device)
                t0 = time.perf_counter()
                run = subprocess.run(cmd, capture_output=True, text=True)
                times[name].append(time.perf_counter() - t0)
                if run.returncode != 0:
                    raise RuntimeError(f"{name}: {run.stderr.strip().splitlines()[-1:]}")
                if r == 0:
                    found[name] = _score(side, out, truth, cfg, raster)
    for name, ts in times.items():
        found[name] |= {"wall_s": statistics.median(ts), "wall_s_all": [round(t, 2) for t in ts]}
    return {"raster": raster, "rounds": rounds, "device": device, "rows": found,
            "ratios": _ratios(found)}


def _score(side: str, out: Path, truth: Path | None, cfg, raster: str) -> dict[str, Any]:
    from .detect import duplicate_count, raster_ap

    dets = _read(side, out)
    row: dict[str, Any] = {"detections": len(dets)}
    if truth is not None:
        row |= raster_ap(truth, dets, cfg.category_ids())
        row |= duplicate_count(truth, dets, cfg.category_ids(), None)
    return row


def _ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """SAHI's seconds over querydet's: at defaults (SAHI fp32, as its users run a torch model,
    against querydet's default precision) and at the same precision on both sides."""
    wall = {k: v["wall_s"] for k, v in rows.items()}
    out = {}
    if "sahi_fp32" in wall and "querydet" in wall:
        out["defaults"] = wall["sahi_fp32"] / wall["querydet"]
    if "sahi_fp32" in wall and "querydet_fp32" in wall:
        out["same_precision_fp32"] = wall["sahi_fp32"] / wall["querydet_fp32"]
    if "sahi_bf16" in wall and "querydet" in wall:
        out["same_precision_bf16"] = wall["sahi_bf16"] / wall["querydet"]
    return out


def format_whole(report: dict[str, Any]) -> str:
    lines = [f"whole process on {report.get('device', 'cpu')} ({report['rounds']} rounds, median), "
             f"{report['raster']}",
             f"{'row':<16}{'wall s':>9}{'AP':>8}{'AP50':>8}{'dups':>6}{'dets':>8}"]
    for name, row in report["rows"].items():
        lines.append(f"{name:<16}{row['wall_s']:>9.2f}{row.get('AP', float('nan')):>8.3f}"
                     f"{row.get('AP50', float('nan')):>8.3f}{row.get('duplicates', -1):>6}"
                     f"{row['detections']:>8}")
    lines += [f"SAHI / querydet, {k.replace('_', ' ')}: {v:.2f}x" for k, v in report["ratios"].items()]
    return "\n".join(lines)
