"""The house: imports run one way (no circle), models/ knows pixels and tensors only, rooms
stay small (no function over 80 lines, no file over 500)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"querydet_cli": ROOT / "querydet_cli", "querydet_models": ROOT / "models"}
FILES = sorted(p for d in PACKAGES.values() for p in d.glob("*.py"))


def _module(path: Path) -> str:
    package = next(name for name, d in PACKAGES.items() if path.parent == d)
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def _imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at module level or inside a function."""
    package = _module(path).rsplit(".", 1)[0] if path.stem != "__init__" else _module(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the package
                base = package if not node.module else f"{package}.{node.module}"
                names = [base] if node.module else [f"{package}.{a.name}" for a in node.names]
                found.update(names)
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    ours = {_module(p) for p in FILES}
    return {m for m in found if m in ours and m != _module(path)}


def test_imports_form_no_circle():
    graph = {_module(p): _imports(p) for p in FILES}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):]
                                                                     + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("path", sorted(PACKAGES["querydet_models"].glob("*.py")),
                         ids=lambda p: p.name)
def test_models_know_pixels_and_tensors_only(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    assert not names & {"querydet_cli", "rasterio", "geopandas", "typer", "shapely", "pyogrio"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_rooms_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 500, f"{path.name}: {len(text.splitlines())} lines"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{path.name}: functions over 80 lines: {long}"
