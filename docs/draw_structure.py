"""Draw the house: querydet's rooms (packages) from the bottom up, and which room imports which,
from the import graph that tests/test_structure.py checks (no circle, no arrow back up).

    python docs/draw_structure.py            # rewrites docs/structure.md

tests/test_structure.py fails when docs/structure.md is not what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_structure import FILES, GRAPH, LAYERS, PACKAGES, _module, _room  # noqa: E402

FOLDERS = {"querydet_cli": "querydet_cli", "querydet_models": "models"}


def room_edges(package: str) -> set[tuple[str, str]]:
    """(importer room, imported room) pairs inside one package, rooms apart."""
    edges = set()
    for module, targets in GRAPH.items():
        if module in PACKAGES or _room(module)[0] != package:
            continue
        for target in targets:
            tpackage, troom = _room(target)
            if tpackage == package and troom != _room(module)[1]:
                edges.add((_room(module)[1] or "(top)", troom or "(top)"))
    return edges


def modules_of(package: str, room: str) -> list[str]:
    out = []
    for path in FILES:
        module = _module(path)
        if module in PACKAGES or _room(module) != (package, room) or path.stem == "__init__":
            continue
        out.append(path.stem)
    return sorted(out)


def render() -> str:
    lines = ["# The house: querydet's rooms", "",
             "Written by `python docs/draw_structure.py` from the import graph that",
             "`tests/test_structure.py` checks: imports run one way, from a room to itself or to",
             "a room below it, with no circle. Rooms are listed from the bottom up.", ""]
    for package, layers in LAYERS.items():
        folder = FOLDERS[package]
        lines += [f"## {package} (`{folder}/`)", "", "```mermaid", "flowchart BT"]
        for room in layers:
            name = room or "(top)"
            lines.append(f'    {package}_{name.strip("()")}["{name}"]')
        for a, b in sorted(room_edges(package)):
            lines.append(f'    {package}_{a.strip("()")} --> {package}_{b.strip("()")}')
        lines += ["```", "", "| room | modules |", "|---|---|"]
        for room in layers:
            mods = modules_of(package, room)
            where = f"`{folder}/{room}/`" if room and not (PACKAGES[package] / f"{room}.py").exists() \
                else f"`{folder}/{room}.py`" if room else f"`{folder}/`"
            lines.append(f"| {where} | {', '.join(mods) if mods else room} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    target = ROOT / "docs" / "structure.md"
    target.write_text(render())
    print(f"{target}: {len(room_edges('querydet_cli'))} + {len(room_edges('querydet_models'))} "
          "room-to-room imports")
