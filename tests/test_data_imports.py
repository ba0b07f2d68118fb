"""The modules of osbc.data import each other without a cycle (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import osbc.data

PACKAGE = Path(osbc.data.__file__).parent


def import_graph(folder: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports, anywhere in its body."""
    mods = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((folder / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    target = node.module.split(".")[0]
                    graph[m] |= {target} & mods
                else:  # from . import x
                    graph[m] |= {a.name for a in node.names} & mods
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    if n.startswith("osbc.data."):
                        graph[m] |= {n.split(".")[2]} & mods
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle reachable by depth-first search, each as the path that closes it."""
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def test_finder_sees_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_osbc_data():
    graph = import_graph(PACKAGE)
    assert graph["saccade"] >= {"nmnist", "cache", "subsets"}  # the graph sees real edges
    assert find_cycles({m: deps - {"__init__"} for m, deps in graph.items() if m != "__init__"}) == []
