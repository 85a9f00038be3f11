"""MkDocs hooks: pages that are written from the code and from measurements, never by hand.

- `{{ cli_reference }}`: every command of the Typer app with its options (names, types,
  defaults, help), read from the app itself.
- `{{ results:NAME }}`: the tables of one kind of measurement, rendered from the current JSON
  files in docs/results/ (each names the command that produced it and the machine).

`python docs/hooks.py cli` prints the CLI reference (tests/test_docs.py compares it with the app);
`python docs/hooks.py readme` rewrites the README's headline table from the same results.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# -- the CLI reference ------------------------------------------------------------------------
def cli_reference() -> str:
    import click
    import typer

    from querydet_cli.app import app

    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="querydet")
    out = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        cctx = click.Context(command, info_name=name, parent=ctx)
        out += [f"## `querydet {name}`", "", _clean(command.help or ""), "",
                "| option | type | default | what it does |", "|---|---|---|---|"]
        for param in command.params:
            if param.name == "help":
                continue
            names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
            if isinstance(param, click.Argument):
                names = f"`{param.name.upper()}`"
            kind = "flag" if getattr(param, "is_flag", False) else _type(param, cctx)
            default = "" if param.required or param.default in (None, (), []) or \
                getattr(param, "is_flag", False) and not param.default else f"`{_show(param.default)}`"
            out.append(f"| {names} | {kind} | {default} | {_cell(getattr(param, 'help', '') or '')} |")
        out.append("")
    return "\n".join(out)


def _type(param, ctx) -> str:
    """What the option takes, as the app's own help shows it (choices, ranges)."""
    try:
        shown = param.display_type(ctx).strip("<>")
    except (AttributeError, TypeError):  # plain click parameters
        shown = param.type.name.lower()
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if " range" in shown:
        shown = shown.replace(" range", "") + f" {'' if low is None else low}.." \
            f"{'' if high is None else high}"
    return shown.replace("|", " \\| ")


def _show(value) -> str:
    value = getattr(value, "value", value)
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _clean(text: str) -> str:
    return re.sub(r"\n\s*\n", "\n\n", text.replace("\b", "")).strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -- results ------------------------------------------------------------------------------------
def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _source(data: dict, name: str) -> str:
    versions = data.get("versions") or ({"torch": data["torch"]} if "torch" in data else {})
    said = ", ".join(f"{k} {v}" for k, v in versions.items())
    machine = data.get("machine", "this machine")
    if isinstance(machine, dict):
        machine = ", ".join(f"{v} {k}" if k == "cpus" else str(v) for k, v in machine.items())
    return (f"*`{data.get('command', '')}` on {machine}"
            + (f"; {said}" if said else "") + f" ([{name}](results/{name})).*")


def _table(columns: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _notes(sources: list[str]) -> str:
    return "\n".join(f"- {s}" for s in sources)


def _mode_cells(m: dict, digits: int, missing: str) -> list[str]:
    """A `querydet bench` mode's seconds, its ratios to dense-HR and to the baseline, and its
    error at the keys."""
    err = f"{m['max_rel_err']:.1e}" if m.get("max_rel_err") is not None else missing
    return [f"{m['time_s']:.{digits}f}", f"{m['speedup_vs_dense']:.2f}x",
            f"{m['speedup_vs_baseline']:.2f}x", err]


def _detect_vs_sahi() -> str:
    rows, notes = [], []
    for name in sorted(p.name for p in RESULTS.glob("detect-vs-sahi-*.json")):
        d = _load(name)
        r, ratios = d["rows"], d["ratios"]
        wall = lambda k: f"{r[k]['wall_s']:.1f} s" if k in r else ""  # noqa: E731
        scored = "AP" in r.get("querydet", {}) and "AP" in r.get("sahi_fp32", {})
        rows.append([name[len("detect-vs-sahi-"):-5].replace("-", " "), wall("querydet"),
                     wall("querydet_fp32"), wall("sahi_fp32"), wall("sahi_bf16"),
                     f"{ratios['defaults']:.2f}x",
                     f"{ratios.get('same_precision_fp32', 0):.2f}x / "
                     f"{ratios.get('same_precision_bf16', 0):.2f}x",
                     f"{r['querydet']['AP']:.3f} / {r['sahi_fp32']['AP']:.3f}" if scored else "",
                     f"{r['querydet'].get('seam_duplicates', '')} / "
                     f"{r['sahi_fp32'].get('seam_duplicates', '')}" if scored else ""])
        notes.append(_source(d, name))
    return _table(["raster", "querydet (bf16)", "querydet fp32", "SAHI fp32", "SAHI bf16",
                   "defaults vs SAHI fp32", "same precision fp32 / bf16", "AP querydet / SAHI",
                   "seam duplicates"], rows) + "\n\n" + _notes(notes)


def _memory() -> str:
    d = _load("detect-memory.json")
    rows = [[f"{r['size']}^2", f"{r['megapixels']:.0f}", f"{r['peak_rss_mib']:.0f} MiB",
             f"{r['seconds']:.1f}", r["detections"]] for r in d["memory"]]
    return _table(["raster", "megapixels", "peak memory", "seconds", "detections"], rows) + \
        f"\n\nLargest / smallest peak: {d['rss_ratio']:.2f}x.\n\n" + \
        _source(d, "detect-memory.json")


def _heads() -> str:
    out = []
    for name in ("heads-r50-1024-precision.json", "heads-r50-1024-precision-cuda-h200.json",
                 "heads-r50-4096-precision-cuda-h200.json"):
        d = _load(name)
        size = "x".join(map(str, d["image_size"]))
        rows = [[mode.rsplit("_", 1)[0], m.get("precision", ""), *_mode_cells(m, 3, "")]
                for mode, m in d["modes"].items()]
        out += [f"**{d['device']}, {d['backbone']}, {size}**", "",
                _table(["mode", "precision", "seconds", "vs dense-HR", "vs baseline",
                        "max rel. error"], rows), "", _source(d, name), ""]
    return "\n".join(out)


def _video() -> str:
    d = _load("video-flight.json")
    names = {"video": "`detect flight.mp4`", "png": "`detect` on the frames as PNG files",
             "video_track": "`detect flight.mp4 --track`",
             "sahi_video_bf16": "SAHI's video prediction (same weights, bf16)"}
    rows = []
    for k, label in names.items():
        r = d["rows"][k]
        rows.append([label, f"{r['frames_per_s']:.2f}",
                     *(f"{r[key]:.3f}" if key in r else "" for key in ("ap50", "mota", "idf1"))])
    m = d["memory"]
    return _table(["run", "frames/s", "AP50", "MOTA", "IDF1"], rows) + (
        f"\n\nPeak memory of `detect --track --fps 1`: {m['30s']['peak_rss_mib']:.0f} MiB over a "
        f"30-second flight, {m['300s']['peak_rss_mib']:.0f} MiB over a 5-minute one "
        f"({d['memory_ratio_300s_vs_30s']:.2f}x).\n\n") + _source(d, "video-flight.json")


def _runtimes() -> str:
    out = []
    for name in ("runtimes-busy-4096.json", "runtimes-survey-4096.json"):
        d = _load(name)
        rows = [[r["runtime"], r["precision"], f"{r['whole_process_s']:.2f} s",
                 f"{r['in_process_s']:.2f} s", f"{r['AP50']:.3f}"] for r in d["rows"].values()]
        out += [f"**{Path(d['raster']).name}**", "",
                _table(["runtime", "precision", "whole process", "in process", "AP50"], rows),
                "", _source(d, name), ""]
    return "\n".join(out)


def _families() -> str:
    """The FCOS and Faster R-CNN rows of `querydet bench`: each mode against dense-HR and the
    family's baseline, the error at the keys, and the share of P2 / P3 computed."""
    rows, notes = [], []
    for name, family in (("heads-r50-1024-fcos.json", "FCOS"),
                         ("heads-r50-1024-faster-rcnn.json", "Faster R-CNN")):
        d = _load(name)
        for mode, m in d["modes"].items():
            levels = m.get("levels", {})
            share = " / ".join(f"{levels[k]['fraction_computed']:.1%}" if k in levels else "-"
                               for k in ("P2", "P3"))
            label = f"`{mode}`" + (" (baseline)" if mode == d["baseline"] else "")
            rows.append([family, label, *_mode_cells(m, 2, "-"), share])
        notes.append(_source(d, name))
    return _table(["family", "mode", "time s", "vs dense-HR", "vs baseline", "max_rel_err",
                   "P2 / P3 MACs computed"], rows) + "\n\n" + _notes(notes)


def _ray() -> str:
    """`detect --ray` with one and two single-thread actors on the same rasters."""
    d = _load("detect-ray.json")
    rows = []
    for key in sorted(k for k in d if k.startswith("size_")):
        r = d[key]["ray_scaling"]
        rates = r["megapixels_per_s"]
        rows.append([f"{r['rasters']} x {r['size']}^2 ({r['megapixels']:.0f} Mpx)",
                     f"{rates['1']:.2f} Mpx/s", f"{rates['2']:.2f} Mpx/s", f"{r['ratio']:.2f}x"])
    return _table(["rasters", "1 worker", "2 workers", "ratio"], rows) + "\n\n" + \
        _source(d, "detect-ray.json")


def _eval_synthetic() -> str:
    """COCO AP on the 50 held-out synthetic scenes of the FCOS and Faster R-CNN families, with
    and without the query head; CSQ at sigma 0.15."""
    models = [("fcos_mobilenet_synthetic", "FCOS P3-P7"),
              ("querydet_fcos_mobilenet_synthetic", "QueryDet (FCOS)"),
              ("faster_rcnn_mobilenet_synthetic", "Faster R-CNN (1-conv RPN)"),
              ("querydet_faster_rcnn_mobilenet_synthetic", "Faster R-CNN, 3-conv RPN + query")]
    rows, notes = [], []
    for name, label in models:
        d = _load(f"eval-synthetic-{name}.json")
        query = name.startswith("querydet")
        for row in d["rows"]:
            if row["run"] not in ("dense", "csq sigma=0.15"):
                continue
            csq = "-" if not query else ("no" if row["run"] == "dense" else "sigma 0.15")
            rows.append([label, csq, *(f"{row[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs",
                                                                  "APm")),
                         f"{row['images_per_s']:.1f}"])
        notes.append(_source(d, f"eval-synthetic-{name}.json"))
    return _table(["model", "CSQ", "AP", "AP50", "AP75", "APs", "APm",
                   "images/s (CPU, 192 px)"], rows) + "\n\n" + _notes(notes)


def _next_site() -> str:
    """The next-site loop: per direction, each variant's AP50 per seed, mean, training time."""
    d = _load("next-site.json")
    names = {"baseline": "the first-site model as it is",
             "self": "(a) self-training alone (`--pseudo-labels`, 2 rounds)",
             "corrected": "(b) corrections of the west fifth, refine recipe (default)",
             "corrected_finetune": "(b) the same corrections, first-site recipe",
             "both": "(c) self-training, then the corrections"}
    out = []
    for key, by_seed in d["rows"].items():
        seeds = sorted(by_seed, key=int)
        rows = []
        for name, label in names.items():
            values = [by_seed[s][name] for s in seeds]
            times = sorted(by_seed[s].get(f"{name}_train_s", by_seed[s]["base_train_s"])
                           for s in seeds)
            kept = [by_seed[s].get(f"{name}_first_site") for s in seeds]
            kept = [k for k in kept if k is not None]
            rows.append([label, ", ".join(f"{v:.3f}" for v in values),
                         f"{sum(values) / len(values):.3f}",
                         f"{sum(kept) / len(kept):.3f}" if kept else "",
                         "" if name == "baseline" else f"{times[len(times) // 2]:.0f} s"])
        src, dst = key.split("->")
        out += [f"**{src} -> {dst}** (seeds {', '.join(seeds)})", "",
                _table(["model", f"AP50 on {dst}'s other four fifths, per seed", "mean",
                        f"AP50 kept on {src}'s validation block, mean", "training, median"],
                       rows), ""]
    return "\n".join(out) + _source(d, "next-site.json")


def headline() -> str:
    """The README's one table: whole process against SAHI on the largest rasters, CPU and GPU."""
    rows = []
    for name, label in (("detect-vs-sahi-busy-8192.json", "busy"),
                        ("detect-vs-sahi-survey-8192.json", "survey"),
                        ("detect-vs-sahi-busy-8192-cuda-h200.json", "busy")):
        d = _load(name)
        r, ratios = d["rows"], d["ratios"]
        rows.append([label, "NVIDIA H200" if "h200" in name else "2-core CPU",
                     f"{r['querydet']['wall_s']:.1f} s", f"{r['sahi_fp32']['wall_s']:.1f} s",
                     f"{ratios['defaults']:.2f}x", f"{ratios['same_precision_fp32']:.2f}x / "
                     f"{ratios['same_precision_bf16']:.2f}x",
                     f"{r['querydet']['AP']:.3f} / {r['sahi_fp32']['AP']:.3f}"
                     if "AP" in r["querydet"] else "not scored"])
    return _table(["raster (8192^2)", "machine", "querydet", "SAHI fp32", "faster, defaults",
                   "faster, same precision (fp32 / bf16)", "AP querydet / SAHI"], rows)


RENDERERS = {"detect-vs-sahi": _detect_vs_sahi, "memory": _memory, "heads": _heads,
             "video": _video, "runtimes": _runtimes, "families": _families, "ray": _ray,
             "eval-synthetic": _eval_synthetic, "next-site": _next_site}


def readme_block(text: str) -> str:
    """The README with its headline block rewritten from the results."""
    return re.sub(r"(<!-- results:headline -->\n).*?(\n<!-- /results -->)",
                  lambda m: m[1] + headline() + m[2], text, flags=re.S)


def render(markdown: str) -> str:
    markdown = markdown.replace("{{ cli_reference }}", cli_reference()) \
        if "{{ cli_reference }}" in markdown else markdown
    return re.sub(r"\{\{ results:([\w-]+) \}\}", lambda m: RENDERERS[m[1]](), markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs hook
    return render(markdown)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["cli"]:
        print(cli_reference())
    elif sys.argv[1:] == ["readme"]:  # rewrite the README's headline table from the results
        readme = Path(__file__).resolve().parent.parent / "README.md"
        readme.write_text(readme_block(readme.read_text()))
    else:
        print(render(sys.stdin.read()))
