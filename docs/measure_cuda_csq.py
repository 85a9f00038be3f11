"""Exact CSQ against the dense high-resolution heads and the P3-P7 baseline on a GPU, in bf16
and in TF32, each sparse backend timed in the same run; writes docs/results/cuda-csq.json.

    python docs/measure_cuda_csq.py                      # on the GPU machine (about 3 minutes)
    DEV=cpu SIZES=256 python docs/measure_cuda_csq.py    # the same script tried on a CPU

`querydet bench` with the R50 config's model (random weights, simulated queries at 3% of the
start level, as the README's head table) at each size and precision. Every backend of exact CSQ
is timed (torch gather-GEMM, blocks: gathered blocks through cuDNN, triton: one fused kernel per
conv, spconv where its wheel loads beside the device's torch); "csq_ms" is the fastest, the one `--backend auto` should take there,
and "max_rel_err" its largest relative difference to the dense heads at the keys, in that
precision. Medians of --repeats runs. Off CUDA, tf32 is fp32 (the CPU has no TF32).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT_JSON", ROOT / "docs" / "results" / "cuda-csq.json"))
DEV = os.environ.get("DEV", "cuda")
SIZES = [int(s) for s in os.environ.get("SIZES", "1024,4096").split(",")]
REPEATS = os.environ.get("REPEATS", "5")


def bench(size: int) -> dict:
    from querydet_models.layers.sparse import spconv_available

    backends = "torch,blocks,triton" + (",spconv" if spconv_available() else "")
    run = subprocess.run([sys.executable, "-m", "querydet_cli", "bench", "--backbone",
                          "resnet50", "--image-size", str(size), "--device", DEV, "--precision",
                          "bf16,tf32", "--backends", backends, "--repeats", REPEATS, "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"bench {size} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout)


def rows_of(size: int, report: dict) -> list[dict]:
    rows = []
    for precision in report["precisions"]:
        suffix = "" if len(report["precisions"]) == 1 else f"_{precision}"
        modes = {name[:-len(suffix)] if suffix else name: m
                 for name, m in report["modes"].items() if name.endswith(suffix)}
        exact = {name.removeprefix("csq_exact_"): m for name, m in modes.items()
                 if name.startswith("csq_exact_")}
        best = min(exact, key=lambda b: exact[b]["time_s"])
        rows.append({"size": size, "precision": precision, "math": modes["dense_hr"]["math"],
                     "dense_hr_ms": round(modes["dense_hr"]["time_s"] * 1000, 2),
                     "csq_ms": round(exact[best]["time_s"] * 1000, 2), "csq_backend": best,
                     "baseline_ms": round(modes["retinanet_p3_p7"]["time_s"] * 1000, 2),
                     "max_rel_err": exact[best]["max_rel_err"],
                     "backends_ms": {b: round(m["time_s"] * 1000, 2) for b, m in exact.items()},
                     "speedup_vs_dense": round(modes["dense_hr"]["time_s"]
                                               / exact[best]["time_s"], 3)})
    return rows


def main() -> None:
    import torch

    card = torch.cuda.get_device_name(0) if DEV == "cuda" else platform.processor() or "cpu"
    result = {"what": "exact CSQ against the dense high-resolution heads and the RetinaNet P3-P7 "
                      "baseline, R50, simulated queries at 3% of P4, in-process head and "
                      "backbone time (querydet bench)",
              "command": "python docs/measure_cuda_csq.py", "device": card,
              "torch": torch.__version__,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "rows": []}
    for size in SIZES:
        result["rows"] += rows_of(size, bench(size))
        print(json.dumps(result["rows"][-2:]), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
