"""The package's import graph: no circle (function-level imports included), and the house's borders."""

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "dpbench"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, modules: dict) -> set[str]:
    """Every dpbench module ``path`` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None (depth-first search with colours)."""
    colour, parent = {}, {}
    for start in sorted(graph):
        if start in colour:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = "grey"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = "black"
                stack.pop()
            elif colour.get(child) == "grey":
                path, at = [child], node
                while at != child:
                    path.append(at)
                    at = parent[at]
                return path[::-1]
            elif child not in colour:
                colour[child], parent[child] = "grey", node
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_package_has_no_import_circle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) is not None
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_models_never_import_data_code_and_privacy_never_imports_a_model():
    graph = _graph()
    for module, imported in graph.items():
        if module.startswith("dpbench.models"):
            assert not {m for m in imported if m.startswith("dpbench.data")}, module
        if module.startswith("dpbench.privacy"):
            assert not {m for m in imported if m.startswith("dpbench.models")}, module
