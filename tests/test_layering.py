"""The package's layering, checked on the source (type-only imports aside):

- no module imports itself back through others;
- the engine knows methods only as a type (`st3.engine.protocol.Policy`), and selectors know no engine;
- adapters own model facts and never reach into the engine;
- apps (command line, bench, demo, plugins, plots) use the engine's public names only, never a private one;
- method knowledge (isinstance on method classes) stays inside st3.methods;
- the library never imports the scenes package at module level (the scenes package depends on st3).

Each rule is also checked to fail on the break it exists for (`test_each_rule_catches_its_break`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import st3

ROOT = Path(st3.__file__).parent
APPS = ("st3.cli", "st3.demo", "st3.compare", "st3.viz", "st3.bench", "st3.plugins")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def runtime_nodes(tree: ast.AST, top_level_only: bool = False):
    """The nodes of `tree` outside `if TYPE_CHECKING:` blocks (and outside functions, if `top_level_only`)."""

    def visit(node: ast.AST):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from visit(child)
            return
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        yield node
        for child in ast.iter_child_nodes(node):
            yield from visit(child)

    yield from visit(tree)


def imports(source: str, top_level_only: bool = False) -> set[str]:
    """Every module (and `module.name`) `source` imports."""
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(source), top_level_only):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from st3 import compat`
    return found


def st3_imports(name: str, source: str) -> set[str]:
    return {m for m in imports(source) if m in MODULES and m not in ("st3", name)}


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


def private_engine_names() -> set[str]:
    """Names the engine defines for itself: functions, methods and attributes starting with one underscore."""
    names: set[str] = set()
    for name, path in MODULES.items():
        if name.startswith("st3.engine"):
            for node in ast.walk(ast.parse(path.read_text())):
                defined = getattr(node, "name", None) if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
                defined = node.attr if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) else defined
                if defined and defined.startswith("_") and not defined.startswith("__"):
                    names.add(defined)
    return names


METHOD_CLASSES = {cls.__name__ for name in st3.methods() for cls in type(st3.get(name)).__mro__} - {"object"}


# ---------------------------------------------------------------------------------------------- the rules
def cycle_problem(graph: dict[str, set[str]]) -> str | None:
    found = cycle_through(graph)
    return " -> ".join(found) if found else None


def engine_problem(name: str, source: str) -> str | None:
    if name.startswith("st3.engine"):
        reached = sorted(m for m in st3_imports(name, source) if m.startswith("st3.methods"))
        return f"{name} imports {reached}" if reached else None
    if name.startswith(("st3.selectors", "st3.adapters")):
        reached = sorted(m for m in st3_imports(name, source) if m.startswith("st3.engine"))
        return f"{name} imports the engine: {reached}" if reached else None
    return None


def private_problem(name: str, source: str, private: set[str]) -> str | None:
    if not name.startswith(APPS):
        return None
    used = set()
    for node in runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in private:
            used.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in private:
            used.add(node.value)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("st3.engine"):
            used.update(alias.name for alias in node.names if alias.name.startswith("_"))
    return f"{name} uses private engine names {sorted(used)}" if used else None


def isinstance_problem(name: str, source: str) -> str | None:
    if name.startswith("st3.methods"):
        return None
    for node in runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            named = {getattr(n, "id", getattr(n, "attr", None)) for n in ast.walk(node.args[1])}
            if named & METHOD_CLASSES:
                return f"{name} checks method classes {sorted(named & METHOD_CLASSES)}: ask the method instead"
    return None


def scenes_problem(name: str, source: str) -> str | None:
    found = {m for m in imports(source, top_level_only=True) if m.split(".")[0] == "st3_scenes"}
    return f"{name} imports {sorted(found)} at module level" if found else None


SOURCES = {name: path.read_text() for name, path in MODULES.items()}


def test_no_module_imports_itself_back():
    assert cycle_problem({name: st3_imports(name, source) for name, source in SOURCES.items()}) is None


@pytest.mark.parametrize("rule", ["engine", "private", "isinstance", "scenes"])
def test_every_module_keeps_to_its_layer(rule):
    private = private_engine_names()
    check = {
        "engine": engine_problem,
        "private": lambda name, source: private_problem(name, source, private),
        "isinstance": isinstance_problem,
        "scenes": scenes_problem,
    }[rule]
    problems = [p for name, source in SOURCES.items() if (p := check(name, source))]
    assert not problems, problems


def test_each_rule_catches_its_break():
    """The four breaks the rules exist for, reintroduced on copies of real modules, are caught."""
    private = private_engine_names()
    assert {"_prefill", "_decode", "_evict"} <= private
    assert cycle_problem({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == "a -> b -> c -> a"
    qwen = SOURCES["st3.adapters.qwen_vl"] + "\nfrom st3.engine.cache import PrunableLayer\n"
    assert engine_problem("st3.adapters.qwen_vl", qwen)
    assert engine_problem("st3.engine.forward", SOURCES["st3.engine.forward"] + "\nimport st3.methods.base\n")
    profile = SOURCES["st3.bench.profile"] + '\nfrom st3.engine.forward import Engine\nSTEPS = ((Engine, "_decode"),)\n'
    assert private_problem("st3.bench.profile", profile, private)
    assert private_problem("st3.cli", "from st3.engine.cache import _blocks\n", private)
    budget = SOURCES["st3.budget"] + "\ndef scaled(m):\n    return isinstance(m, (ST3, FastV))\n"
    assert isinstance_problem("st3.budget", budget)
    assert scenes_problem("st3.demo", SOURCES["st3.demo"] + "\nfrom st3_scenes import MODEL_DIR\n")
    assert not scenes_problem("st3.demo", "def f():\n    from st3_scenes import MODEL_DIR\n")
