"""The house: imports run one way (no circle, no arrow from a lower room back up to a higher
one), models/ knows pixels and tensors only, rooms stay small (no function over 80 lines, no
file over 500, no folder of more than 15 modules) and querydet_cli's top folder holds only its
entry points."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"querydet_cli": ROOT / "querydet_cli", "querydet_models": ROOT / "models"}
FILES = sorted(p for d in PACKAGES.values() for p in d.rglob("*.py")
               if not {"configs", "sample_data"} & set(p.relative_to(d).parts))

# Each package's rooms from the bottom up: a module may import its own room and the rooms below
# it, never one above. The order is the pipeline's: what every room shares, the records and
# formats written, reading the inputs, the pipeline (planning, producing, merging, the journal),
# the viewer, training, the runtimes; then
# the Python API (a top-level module), the benchmarks that measure through it, the commands, and
# the console entry point. In querydet_models the top-level modules are the foundation.
LAYERS = {
    "querydet_cli": ["core", "outputs", "reading", "pipeline", "viewer", "training", "runtimes",
                     "api", "bench", "commands", "app", "__main__"],
    "querydet_models": ["", "layers", "query", "detectors", "export"],
}
TOP_LEVEL = {"querydet_cli": {"__init__", "__main__", "app", "api"},
             "querydet_models": {"__init__", "errors", "config", "checkpoint", "_torchvision",
                                 "backbone_specs"}}


def _module(path: Path) -> str:
    package = next(name for name, d in PACKAGES.items() if path.is_relative_to(d))
    parts = list(path.relative_to(PACKAGES[package]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _room(module: str) -> tuple[str, str]:
    """(package, room): the folder under the package a module lives in ("" at the top)."""
    parts = module.split(".")
    package = parts[0]
    is_folder = (PACKAGES[package].joinpath(*parts[1:]) / "__init__.py").exists()
    inner = parts[1:] if is_folder else parts[1:-1]
    if inner:
        return package, inner[0]
    top = parts[-1] if len(parts) > 1 else ""  # a module of the top folder
    return package, top if top in LAYERS[package] else ""


def _imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at module level or inside a function."""
    me = _module(path)
    package = me if path.stem == "__init__" else me.rsplit(".", 1)[0]
    ours = {_module(p) for p in FILES}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, `level - 1` folders up
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in ours and m != me and not me.startswith(m + ".")}


GRAPH = {_module(p): _imports(p) for p in FILES}


def test_imports_form_no_circle():
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):]
                                                                     + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])


def test_no_import_runs_back_up():
    """A package's __init__ may name what lies under it (its door); every other import goes to
    the same room or one below."""
    up = []
    for module, targets in GRAPH.items():
        if module in PACKAGES:  # the package's own door names what lies under it
            continue
        package, room = _room(module)
        rank = LAYERS[package].index(room)
        for target in targets:
            tpackage, troom = _room(target)
            if tpackage != package:
                assert (package, tpackage) == ("querydet_cli", "querydet_models"), \
                    f"{module} imports {target}"
                continue
            if LAYERS[package].index(troom) > rank:
                up.append(f"{module} -> {target}")
    assert not up, "imports running back up: " + ", ".join(sorted(up))


def test_every_folder_is_a_declared_room():
    for package, root in PACKAGES.items():
        rooms = {p.parent.relative_to(root).parts[0] for p in root.rglob("__init__.py")
                 if p.parent != root and not {"configs", "sample_data"}
                 & set(p.relative_to(root).parts)}
        assert rooms <= set(LAYERS[package]) - {""} - TOP_LEVEL[package], \
            rooms - set(LAYERS[package])
        top = {p.stem for p in root.glob("*.py")}
        assert top <= TOP_LEVEL[package], f"{package}: {sorted(top - TOP_LEVEL[package])} " \
            "belong in a room"


@pytest.mark.parametrize("folder", sorted({p.parent for p in FILES}),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_folder_hides_its_architecture(folder):
    modules = [p for p in folder.glob("*.py") if p.stem != "__init__"]
    assert len(modules) <= 15, f"{folder.name}: {len(modules)} modules"


@pytest.mark.parametrize("path", sorted(p for p in FILES if p.is_relative_to(ROOT / "models")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_models_know_pixels_and_tensors_only(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    assert not names & {"querydet_cli", "rasterio", "geopandas", "typer", "shapely", "pyogrio"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_rooms_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 500, f"{path.name}: {len(text.splitlines())} lines"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{path.name}: functions over 80 lines: {long}"


def test_the_drawing_of_the_house_is_current():
    """docs/structure.md is what docs/draw_structure.py draws from this graph today."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("draw_structure",
                                                  ROOT / "docs" / "draw_structure.py")
    draw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(draw)
    assert (ROOT / "docs" / "structure.md").read_text() == draw.render(), \
        "run python docs/draw_structure.py"
