"""The README and the documentation site cannot drift from the code: the README is short, its
headline table is the current results, the CLI reference lists every command and option the
app has, the quick-start commands run, no page narrates the history of the work, and the site
builds strictly."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_read_in_ten_minutes():
    assert len(README.read_text().splitlines()) <= 300


def test_the_readme_headline_is_the_current_results():
    text = README.read_text()
    assert "<!-- results:headline -->" in text
    assert _hooks().readme_block(text) == text, "run python docs/hooks.py readme"


def test_the_cli_reference_lists_every_command_and_option():
    import click
    import typer

    from querydet_cli.app import app

    page = _hooks().cli_reference()
    sections = dict(re.findall(r"## `querydet ([\w-]+)`\n(.*?)(?=\n## `querydet |\Z)", page,
                               re.S))
    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="querydet")
    names = group.list_commands(ctx)
    assert set(sections) == set(names) and len(names) >= 11
    for name in names:
        for param in group.get_command(ctx, name).params:
            if param.name == "help":
                continue
            for opt in (param.opts if isinstance(param, click.Option) else []):
                assert f"`{opt}`" in sections[name], f"{name}: {opt}"


HISTORY = re.compile(
    r"stop ?\d+|\b(this|last|earlier|previous|next) (round|session|stop)\b|before/after|"
    r"\bsessions?\b|\bissue \d+|"
    r"before this (work|change)|\bas before\b|\(before\)|at the time\b|\bused to\b|\bno longer\b|"
    r"\btoday'?s?\b|"
    r"\bnow (takes|runs|is|at)\b|superseded|measured again\b|from [\d.]+ ?(s|ms|MiB) to [\d.]+|"
    r"[\d.]+ ?s -> [\d.]+ ?s", re.I)


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("*.sh")),
                                  *sorted(DOCS.glob("*.py"))], ids=lambda p: p.name)
def test_no_page_narrates_the_history_of_the_work(page):
    found = [line.strip() for line in page.read_text().splitlines() if HISTORY.search(line)]
    assert not found, found


def test_every_result_says_what_made_it():
    import json

    files = sorted((DOCS / "results").glob("*.json"))
    assert len(files) >= 20
    for path in files:
        data = json.loads(path.read_text())
        assert data.get("command") and data.get("machine"), path.name
        assert not re.search(r"stop\d|round|\d+rounds", path.stem), path.name


def _commands(text: str) -> list[str]:
    """The shell lines of a text's bash blocks that run querydet or make."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("querydet ", "make ")):
                lines.append(line)
    return lines


def test_the_quick_start_commands_run(tmp_path):
    """Every command of the README's quick start and of the getting-started page, from an
    empty folder (`make demo` as its recipe in a copy of the sample data)."""
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = _commands(quick) + _commands((DOCS / "getting-started.md").read_text())
    assert "make demo" in commands and any(c.startswith("querydet detect") for c in commands)
    recipe = re.search(r"^demo:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M)[1]
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in dict.fromkeys(commands):
        if command == "make test":  # the suite this test is part of
            continue
        if command == "make demo":
            command = recipe.replace("$(BIN)/", "")
        run = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, (command, run.stderr[-2000:])
    assert (tmp_path / "out" / "sample_detections.geojson").is_file()
    assert (tmp_path / "out" / "sample_detections.html").is_file()
    assert (tmp_path / "out" / "sample_scene_detections.png").is_file()
    assert (tmp_path / "dets.geojson").is_file() and (tmp_path / "dets.html").is_file()


def test_the_site_builds_strictly_and_offline(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d",
                          str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    pages = {p.name for p in site.glob("*.html")}
    assert {"index.html", "cli.html", "api.html", "performance.html", "detect.html",
            "video.html", "structure.html"} <= pages
    cli = (site / "cli.html").read_text()
    assert "querydet detect" in cli and "--frame-stride" in cli
    assert "6.56x" in (site / "performance.html").read_text()  # rendered from the results
    assets = {m for p in site.glob("*.html") for m in
              re.findall(r'(?:src|href)="(https?://[^"]+)"', p.read_text())}
    assert not assets, assets  # nothing fetched from a network
