"""The next site: self-training, a person's corrections, and both, measured across the two NEON
forests.

    python docs/measure_next_site.py [WORKDIR] [--seeds 0,1,2,3]   # about 70 minutes, 2 cores

For each direction (OSBS, Florida -> SOAP, California, and back) and seed: a model trained with
the first-site recipe on the source site (`tile --val-fraction 0.2`, `train --init
sample_model.pt`, `model_best.pt`), then from it, on the target site:

- baseline: the model as it is;
- (a) self-training alone: `train --init M --pseudo-labels TARGET` (two rounds);
- (b) a simulated person corrects the west fifth of the target: its true crowns there become the
  labels of a corrected file whose reviewed area is that strip (a GeoPackage with `labels` and
  `reviewed_areas` for the GeoTIFF, a COCO file with `reviewed_areas` for the PNG, as
  `view --edit` saves them), `tile` cuts chips inside the strip, `train --init M` fine-tunes
  (the refine recipe, the default for a model that knows `tree`); the first-site recipe on the
  same chips (`--recipe finetune`) beside it;
- (c) both: `train --init M --pseudo-labels TARGET --train-annotations corrected chips`.

Every model is scored on the other four fifths of the target (truth and detections whose centre
lies east of the strip), `detect --score-threshold 0.05`, AP50 by pycocotools, maxDets 100, and
on the first site's validation block (its east fifth, never trained on): what it kept. Each
training is timed whole process. Results are written after every run to
docs/results/next-site.json, and runs already there are not repeated (nor a variant already
trained and scored in WORKDIR).
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "docs" / "results" / "next-site.json"
Q = [sys.executable, "-m", "querydet_cli"]
SITES = {
    "OSBS": {"raster": DATA / "neon-osbs-029" / "OSBS_029.tif",
             "labels": DATA / "neon-osbs-029" / "OSBS_029_trees.gpkg"},
    "SOAP": {"raster": DATA / "neon-soap-061" / "SOAP_061.png",
             "coco": DATA / "neon-soap-061" / "annotations.json"},
}
STRIP = 0.2  # the west fifth a person corrects
VAL_FRACTION = 0.2  # the first site's validation block: its east fifth (tile --val-fraction)


def q(*args, cwd: Path) -> float:
    """Run querydet; its wall seconds."""
    t0 = time.perf_counter()
    run = subprocess.run([*Q, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"querydet {' '.join(map(str, args))} failed:\n{run.stderr[-3000:]}")
    return round(time.perf_counter() - t0, 1)


def truth(site: str):
    """The site's true boxes in pixels and the image width."""
    from querydet_cli.training.datasets import load_coco
    from querydet_cli.training.vector_labels import load_vector_labels

    s = SITES[site]
    if "coco" in s:
        sample = load_coco(s["coco"], s["raster"].parent)[0][0]
    else:
        sample = load_vector_labels([str(s["raster"])], s["labels"]).samples[0]
    return sample.boxes, sample.width, sample.height


def source_chips(site: str, work: Path) -> Path:
    out = work / f"chips-{site}"
    if not (out / "annotations.json").is_file():
        s = SITES[site]
        src = (["--annotations", s["coco"], "--images", s["raster"].parent] if "coco" in s
               else [s["raster"], "--labels", s["labels"]])
        q("tile", *src, "--size", 128, "--overlap", 64, "--val-fraction", 0.2, "--out", out,
          cwd=work)
    return out


def corrected_chips(site: str, work: Path) -> Path:
    """What a person's review of the target's west fifth leaves, cut into chips."""
    out = work / f"corrected-{site}"
    if (out / "chips" / "annotations.json").is_file():
        return out / "chips"
    out.mkdir(parents=True, exist_ok=True)
    boxes, width, height = truth(site)
    edge = width * STRIP
    west = boxes[(boxes[:, 0] + boxes[:, 2]) / 2 < edge]
    s = SITES[site]
    if "coco" in s:
        coco = {"images": [{"id": 1, "file_name": s["raster"].name, "width": width,
                            "height": height, "reviewed_areas": [[0, 0, edge, height]]}],
                "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                 "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]),
                                          float(b[3] - b[1])]} for k, b in enumerate(west)],
                "categories": [{"id": 1, "name": "tree"}]}
        (out / "corrected.json").write_text(json.dumps(coco))
        q("tile", "--annotations", out / "corrected.json", "--images", s["raster"].parent,
          "--size", 128, "--overlap", 64, "--out", out / "chips", cwd=work)
    else:
        import geopandas as gpd
        import rasterio
        from shapely.geometry import box

        with rasterio.open(s["raster"]) as src:
            t, crs = src.transform, src.crs
        polys = [box(*(t * (b[0], b[3])), *(t * (b[2], b[1]))) for b in west]
        gpd.GeoDataFrame({"label": ["tree"] * len(polys)}, geometry=polys, crs=crs).to_file(
            out / "corrected.gpkg", layer="labels", driver="GPKG")
        area = box(*(t * (0, height)), *(t * (edge, 0)))
        gpd.GeoDataFrame({"note": ["west fifth"]}, geometry=[area], crs=crs).to_file(
            out / "corrected.gpkg", layer="reviewed_areas", driver="GPKG")
        q("tile", s["raster"], "--labels", out / "corrected.gpkg", "--size", 128, "--overlap",
          64, "--out", out / "chips", cwd=work)
    return out / "chips"


def ap50_east(site: str, detections: Path, strip: float = STRIP) -> float:
    """AP50 (maxDets 100) over the part of the site east of `strip` of its width: the four
    fifths a person did not correct (0.2), or the first site's validation block (0.8)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from querydet_cli.outputs.formats import read_detections

    boxes, width, height = truth(site)
    edge = width * strip
    east = [b for b in boxes.tolist() if (b[0] + b[2]) / 2 >= edge]
    dets = [d for d in read_detections(detections) if (d.bbox[0] + d.bbox[2]) / 2 >= edge]
    if not dets:
        return 0.0
    gt = {"images": [{"id": 1, "width": width, "height": height}],
          "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                           "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                           "area": (b[2] - b[0]) * (b[3] - b[1])} for k, b in enumerate(east)],
          "categories": [{"id": 1, "name": "tree"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        res = coco.loadRes([{"image_id": 1, "category_id": 1, "score": d.score,
                             "bbox": [d.bbox[0], d.bbox[1], d.bbox[2] - d.bbox[0],
                                      d.bbox[3] - d.bbox[1]]} for d in dets])
        ev = COCOeval(coco, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return round(float(ev.stats[1]), 4)


def score(model: Path, site: str, work: Path, name: str, strip: float = STRIP) -> float:
    out = work / f"{name}.ndjson"
    q("detect", SITES[site]["raster"], "--weights", model, "--score-threshold", 0.05, "-o", out,
      "--quiet", cwd=work)
    return ap50_east(site, out, strip)


def first_site(src: str, d: Path) -> dict:
    """What each model still finds on the first site: AP50 on its validation block (the east
    fifth, never trained on), kept beside the variant's result."""
    found = {}
    for name in ("baseline", "self", "corrected", "corrected_finetune", "both"):
        done = d / f"{name}.first-site.json"
        if not done.is_file():
            model = d / ("base/model_best.pt" if name == "baseline" else f"{name}/model_final.pt")
            done.write_text(json.dumps({f"{name}_first_site": score(
                model, src, d, f"{name}-first-site", strip=1 - VAL_FRACTION)}))
        found |= json.loads(done.read_text())
    return found


def one(src: str, dst: str, seed: int, work: Path) -> dict:
    """Every variant of one direction and seed."""
    d = work / f"{src}-{dst}-{seed}"
    d.mkdir(parents=True, exist_ok=True)
    chips = source_chips(src, work)
    corr = corrected_chips(dst, work)
    row: dict = {}
    base = d / "base"
    done = d / "base.result.json"  # each finished variant is kept: a stopped run goes on
    if not done.is_file():
        took = q("train", "--init", ROOT / "sample_data" / "sample_model.pt", "--dataset",
                 "coco", "--train-annotations", chips / "annotations.json", "--val-annotations",
                 chips / "val.json", "--seed", seed, "--out", base, cwd=work)
        done.write_text(json.dumps({"base_train_s": took}))
    row |= json.loads(done.read_text())
    m = base / "model_best.pt"
    row["baseline"] = score(m, dst, d, "baseline")
    corr_args = ["--dataset", "coco", "--train-annotations", corr / "annotations.json"]
    runs = {"self": ["--pseudo-labels", SITES[dst]["raster"]],
            "corrected": corr_args,
            "corrected_finetune": [*corr_args, "--recipe", "finetune"],
            "both": ["--pseudo-labels", SITES[dst]["raster"], *corr_args]}
    for name, args in runs.items():
        done = d / f"{name}.result.json"
        if not done.is_file():
            if (d / name).exists():
                shutil.rmtree(d / name)
            took = q("train", "--init", m, *args, "--seed", seed, "--out", d / name, cwd=work)
            done.write_text(json.dumps({f"{name}_train_s": took,
                                        name: score(d / name / "model_final.pt", dst, d, name)}))
        row |= json.loads(done.read_text())
    return row | first_site(src, d)


def main() -> None:
    import torch

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    seeds = [0, 1, 2, 3]
    if "--seeds" in sys.argv:
        seeds = [int(s) for s in sys.argv[sys.argv.index("--seeds") + 1].split(",")]
        args = [a for a in args if a != sys.argv[sys.argv.index("--seeds") + 1]]
    work = Path(args[0]) if args else Path("/tmp/querydet-next-site")
    work.mkdir(parents=True, exist_ok=True)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    result |= {"what": "a model trained with the recipe on one NEON site, brought to the other: "
                       "self-training, a person's corrections of the west fifth, both; AP50 on "
                       "the other four fifths",
               "command": "python docs/measure_next_site.py",
               "machine": {"cpus": 2, "platform": platform.platform()},
               "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    rows = result.setdefault("rows", {})
    for seed in seeds:  # both directions of a seed before the next seed
        for src, dst in (("OSBS", "SOAP"), ("SOAP", "OSBS")):
            key = f"{src}->{dst}"
            if "corrected_first_site" in rows.get(key, {}).get(str(seed), {}):
                continue
            rows.setdefault(key, {})[str(seed)] = one(src, dst, seed, work)
            summarise(result)
            OUT.write_text(json.dumps(result, indent=1) + "\n")
            print(key, seed, rows[key][str(seed)], flush=True)


def summarise(result: dict) -> None:
    """Means over the seeds measured, per direction and variant."""
    means = {}
    for key, by_seed in result["rows"].items():
        runs = list(by_seed.values())
        names = [n for n in runs[0] if all(n in r for r in runs)]  # measured for every seed
        means[key] = {name: round(statistics.mean(r[name] for r in runs), 4)
                      for name in names if not name.endswith("_s")}
        means[key] |= {name: round(statistics.median(r[name] for r in runs), 1)
                       for name in names if name.endswith("_s")}
        means[key]["seeds"] = len(runs)
    result["means"] = means


if __name__ == "__main__":
    main()
