"""The house's import rules, read from the source with `ast` (nothing is imported): one import root, imports
pointing down (``recipes → callbacks, datamodules → modules → nothing of the project``), no file circle, and a sandbox
child side that imports the standard library only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"recipes.modules": "modules", "recipes.datamodules": "datamodules", "recipes.callbacks": "callbacks",
         "recipes": "recipes"}
LAYER = {"recipes.modules": 1, "recipes.datamodules": 2, "recipes.callbacks": 2, "recipes": 3}
OLD_ROOTS = {"modules", "datamodules", "callbacks"}
CHILD_SIDE = "recipes.modules.code.sandbox"


def _modules() -> dict[str, Path]:
    """Module name -> file, for every source file of the package (the folders mapped into ``recipes``)."""
    out = {}
    for package, folder in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _group(name: str) -> str:
    return max((root for root in LAYER if name == root or name.startswith(root + ".")), key=len)


def _imports(path: Path, name: str, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules that ``path`` imports anywhere in it, top-level names of everything it imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    targets, tops = set(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):  # function-level and TYPE_CHECKING imports count: a circle is a circle
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in candidates:
            tops.add(target.split(".")[0])
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "recipes":  # `recipes/__init__` is every module's parent
                targets.add(target)
    return targets, tops


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = _modules()
    graph, tops = {}, {}
    for name, path in known.items():
        graph[name], tops[name] = _imports(path, name, known)
    return graph, tops


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan), and files importing themselves."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_package_dir_matches_pyproject():
    """The folders this test maps are the ones pyproject installs under the one root."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    mapped = {k: v for k, v in config["package-dir"].items() if k != "recipes.configs"}
    assert mapped == {k: v for k, v in ROOTS.items() if k != "recipes"}
    assert {p.split(".")[0] for p in config["packages"]} == {"recipes"}


def test_the_graph_is_read():
    """Guards the checks below against reading nothing: known arrows are found."""
    graph, _ = _graph()
    assert "recipes.modules.losses" in graph["recipes.modules.dpo"]
    assert "recipes.modules.code.sandbox.kernel" in graph["recipes.modules.code.sandbox.harness"]
    assert "recipes.datamodules.collate" in graph["recipes.datamodules.preference"]
    assert len(graph) > 60


def test_no_file_circle():
    graph, _ = _graph()
    assert _circles(graph) == []


def test_circle_detection_finds_a_planted_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"a"}}) == [["a"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_imports_point_down():
    """recipes -> callbacks, datamodules -> modules -> nothing of the project; callbacks and datamodules are apart."""
    graph, _ = _graph()
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if _group(b) != _group(a) and LAYER[_group(b)] >= LAYER[_group(a)]]
    assert upward == []


def test_one_import_root():
    """Nothing imports the old top-level names (a user's own `modules/` would shadow them)."""
    _, tops = _graph()
    assert {name: t & OLD_ROOTS for name, t in tops.items() if t & OLD_ROOTS} == {}


def test_sandbox_child_side_imports_the_standard_library_only():
    graph, tops = _graph()
    child = [name for name in graph if name.startswith(CHILD_SIDE + ".")]
    assert len(child) >= 3
    siblings = {name.rpartition(".")[2] for name in child}
    for name in child:
        foreign = tops[name] - set(sys.stdlib_module_names) - siblings - {"recipes", "__future__"}
        assert not foreign, (name, foreign)
        assert all(t.startswith(CHILD_SIDE) for t in graph[name]), (name, graph[name])
