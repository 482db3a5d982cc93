"""The appliance's module structure stays as the review asked (issue 13 item 20): no import
cycle between its modules, and nothing outside the `Repository` class reaches into its private
methods (writer, prune and check use public ones).

Both are read from the source with `ast`, so they hold for imports inside functions too
(the usual way a cycle is hidden); `if TYPE_CHECKING:` imports are not run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

APPLIANCE = Path(__file__).resolve().parents[2] / "appliance"


def _module_name(path: Path) -> str:
    parts = path.relative_to(APPLIANCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in APPLIANCE.rglob("*.py")}


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(child for child in ast.iter_child_nodes(node)
                    if not _is_type_checking_block(child))
    return out


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:
                    found.add(full)
                elif base in MODULES:
                    found.add(base)
    found.discard(name)
    # A package's own __init__ is imported on the way to any of its modules: not a cycle.
    return {m for m in found if not name.startswith(m + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_appliance_has_no_import_cycle() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert len(graph) > 50, "the scan found too few modules to mean anything"
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _private_methods_of_repository() -> set[str]:
    tree = ast.parse((APPLIANCE / "repository" / "repository.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Repository")
    return {n.name for n in cls.body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("_")
            and not n.name.startswith("__")}


def _private_reaches(module: str, source: str, private: set[str], own: bool) -> list[str]:
    """`x._name` for a private method name, except `self._name` in the class's own module."""
    return [f"{module}:{node.lineno} .{node.attr}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr in private
            and not (own and isinstance(node.value, ast.Name) and node.value.id == "self")]


def test_nothing_outside_the_repository_class_calls_its_private_methods() -> None:
    private = _private_methods_of_repository()
    own = APPLIANCE / "repository" / "repository.py"
    reaches = [hit for name, path in MODULES.items()
               for hit in _private_reaches(name, path.read_text(), private, path == own)]
    assert reaches == []


def test_the_reach_finder_sees_a_reach() -> None:
    source = "def f(repo):\n    return repo.repo._load_map(1)\n"
    assert _private_reaches("m", source, {"_load_map"}, own=False) == ["m:2 ._load_map"]
    assert _private_reaches("m", "self._load_map()", {"_load_map"}, own=True) == []
