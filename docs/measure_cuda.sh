#!/bin/bash
# The CUDA measurements, in one call of about 5 minutes on a GPU machine (a lent one gives 15
# minutes of device time, start-up included). Run from the repository root there:
#
#   bash docs/measure_cuda.sh            # DEV=cpu SIZE=1024 to try the script here first
#   WHAT=csq bash docs/measure_cuda.sh   # the sparse heads instead (docs/measure_cuda_csq.py)
#
# The machine has torch but not querydet's GIS dependencies. Before the call, download them for
# its Python (3.12 there) into .whl/ (git-ignored via .git/info/exclude, carried with the call):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     rasterio affine click-plugins cligj pyproj shapely pycocotools sahi fire termcolor
# (about 47 MB; the working tree and .whl together must stay under 64 MiB). Everything this
# script writes goes to $OUT as at most 8 files, which is what the device tool brings back.
#
# What it answers: where a whole `querydet detect` run's seconds go on the GPU (`--profile`),
# whether the CPU's 2304 px tiles beat CUDA's 1024 there, and querydet against SAHI as a user
# times them on the object-dense and the survey raster
# (docs/results/detect-vs-sahi-busy-8192-cuda-h200.json). Ground truth is not scored here: pycocotools on a
# busy 8192^2 raster takes minutes of CPU that the lease does not have.
set -u
export PYTHONUNBUFFERED=1
DEV=${DEV:-cuda}
SIZE=${SIZE:-8192}
OUT=${OUT:-/tmp/measure_cuda_out}
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
# the installed names of the checkout's folders (pyproject's package-dir)
[ -e querydet_models ] || ln -s models querydet_models
[ -e querydet_cli/configs ] || ln -s ../configs querydet_cli/configs
[ -e querydet_cli/sample_data ] || ln -s ../sample_data querydet_cli/sample_data
if [ "${WHAT:-detect}" = csq ]; then  # WHAT=csq: the heads (docs/measure_cuda_csq.py) only
    OUT_JSON="$OUT/cuda-csq.json" python3 docs/measure_cuda_csq.py
    exit $?
fi
Q="python3 -m querydet_cli"
W=/tmp/measure_cuda
mkdir -p $W
{
    nvidia-smi -L 2>/dev/null
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    python3 -c "from querydet_models import spconv_available; print('spconv', spconv_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
say "rasters ${SIZE}^2"
python3 -c "
from pathlib import Path
from querydet_cli.training.synthetic import write_big_raster, write_survey_raster
write_big_raster(Path('$W/busy.tif'), $SIZE, truth=Path('$W/busy.json'))
write_survey_raster(Path('$W/survey.tif'), $SIZE, Path('$W/survey.json'))
"
for scene in busy survey; do
    say "profile $scene"
    { time $Q detect $W/$scene.tif -o $W/$scene.ndjson --device $DEV --profile; } \
        >> "$OUT/profile.txt" 2>&1
done
# the CPU's tile plan (2304 px) on the GPU, whole process: is 1024 still the right CUDA default?
for tile in 1024 2304; do
    say "busy, --tile-size $tile"
    { time $Q detect $W/busy.tif -o $W/busy_$tile.ndjson --device $DEV --quiet \
        --tile-size $tile; } >> "$OUT/profile.txt" 2>&1
done
tail -40 "$OUT/profile.txt"
for scene in busy survey; do
    say "whole process against SAHI, $scene"
    timeout 200 $Q bench-detect --sizes '' --device $DEV --raster $W/$scene.tif --peer sahi \
        --whole-process --rounds 2 --workdir $W --json > "$OUT/whole-$scene.json" 2>> "$OUT/log.txt"
    head -c 1500 "$OUT/whole-$scene.json"; echo
done
# the whole-process figures as docs/results/cuda-detect-vs-sahi.json (querydet's default precision is
# bf16 on a card that has it, SAHI's fp32; "same" is the other side's precision)
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
card = next((l.split(":", 1)[1].split("(")[0].strip() for l in (out / "env.txt").read_text().splitlines()
             if l.startswith("GPU ")), "cpu")
rasters = {}
for scene in ("busy", "survey"):
    try:
        r = json.loads((out / f"whole-{scene}.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        continue
    rasters[scene] = {"querydet_s": r["querydet"]["wall_s"], "querydet_same_s": r["querydet_fp32"]["wall_s"],
                      "sahi_fp32_s": r["sahi_fp32"]["wall_s"], "sahi_same_s": r["sahi_bf16"]["wall_s"]}
(out / "cuda-detect-vs-sahi.json").write_text(json.dumps(
    {"device": card, "command": "bash docs/measure_cuda.sh", "rasters": rasters}, indent=1) + "\n")
print(json.dumps(rasters))
PY
say done
