"""The package's layering: no module of st3 imports itself back through others (type-only imports aside).

The engine holds the mechanics and knows methods only as a type; methods reach the engine when applied;
adapters, trace and accounting sit below both. A cycle would blur that, and breaks imports in some orders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import st3

ROOT = Path(st3.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """The st3 modules `path` imports anywhere (functions included), except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from st3 import compat`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in MODULES and name != "st3"}


def cycle_through(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path of modules, or None."""
    state: dict[str, str] = {}

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt] if nxt in path else [*path, nxt]
            if nxt not in state and (found := walk(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start, [start])):
            return found
    return None


def test_no_module_imports_itself_back():
    graph = {name: imported(path) for name, path in MODULES.items()}
    assert cycle_through(graph) is None, " -> ".join(cycle_through(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_through({"a": {"b"}, "b": set()}) is None


def test_the_engine_knows_methods_only_as_a_type():
    engine = {name: path for name, path in MODULES.items() if name.startswith("st3.engine")}
    reached = {name: sorted(m for m in imported(path) if m.startswith("st3.methods")) for name, path in engine.items()}
    assert not any(reached.values()), reached
