"""The package's shape: no import cycles (lazy, function-level imports included), and the input
side (reading ONNX, converting it, the graph) never imports the output side."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ghn_onnx"

# Stages that read a model must not depend on the stages that write one.
INPUT_SIDE = ("ghn_onnx.onnx_io", "ghn_onnx.convert", "ghn_onnx.graph")
OUTPUT_SIDE = ("ghn_onnx.writeback", "ghn_onnx.bn", "ghn_onnx.pipeline", "ghn_onnx.cli", "ghn_onnx.report")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every package module ``path`` imports, anywhere in the file (TYPE_CHECKING blocks excepted:
    they never run). ``from pkg import name`` counts as importing ``pkg.name`` when that is a
    module, else ``pkg``."""
    tree = ast.parse(path.read_text(), str(path))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    me = module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = me.split(".")[: len(me.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(p, known) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_sees_lazy_imports():
    graph = import_graph()
    # cli imports the pipeline inside its commands only: the walk must still see it
    assert "ghn_onnx.pipeline" in graph["ghn_onnx.cli"]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("side", INPUT_SIDE)
def test_input_side_does_not_import_output_side(side):
    graph = import_graph()
    bad = sorted((m, t) for m, targets in graph.items() if m == side or m.startswith(side + ".")
                 for t in targets if any(t == o or t.startswith(o + ".") for o in OUTPUT_SIDE))
    assert not bad, bad


def layout_table() -> str:
    readme = (PACKAGE.parent / "README.md").read_text()
    return readme.split("## Layout", 1)[1].split("\n## ", 1)[0]


def test_readme_layout_names_only_what_exists():
    """Every path the README's layout table names exists (folders end in /, files are relative
    to the folder named before them on the same row)."""
    missing = []
    for row in layout_table().splitlines():
        if not row.startswith("|"):
            continue
        folder = PACKAGE.parent
        for ref in re.findall(r"`([^`\s]+)`", row):
            if ref.endswith("/"):
                folder = PACKAGE.parent / ref
                if not folder.is_dir():
                    missing.append(ref)
            elif "/" in ref or ref.endswith((".py", ".md")):
                path = PACKAGE.parent / ref if "/" in ref else folder / ref
                if not path.exists():
                    missing.append(str(path.relative_to(PACKAGE.parent)))
    assert not missing, missing


def test_readme_layout_names_every_package_folder():
    table = layout_table()
    folders = sorted(str(p.parent.relative_to(PACKAGE.parent)) + "/" for p in PACKAGE.rglob("__init__.py"))
    unnamed = [f for f in folders if f"`{f}`" not in table]
    assert not unnamed, unnamed


def test_readme_layout_names_every_module():
    table = layout_table()
    unnamed = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                     if p.name != "__init__.py" and f"`{p.name}`" not in table)
    assert not unnamed, unnamed
