"""The package's import graph, read from the source (no import is executed).

Every ``import`` and ``from ... import`` statement counts, at module level or inside a
function. A node is a module's dotted name (a package's ``__init__.py`` is the package's
name); ``from P import m`` where ``P.m`` is a module is an edge to ``P.m``, otherwise to ``P``.
Imports of anything outside the package are left out.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "flhf_core"

Graph = dict[str, set[str]]


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name of every module and package under ``package_dir``, with its file."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolved(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package_dir: Path) -> Graph:
    """Module → the package modules it imports."""
    names = module_names(package_dir)
    graph: Graph = {name: set() for name in names}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolved(node, name, is_package)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in names else source)
            graph[name].update(t for t in targets if t in names and t != name)
    return graph


def cycles(graph: Graph) -> list[set[str]]:
    """The import circles: strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def longest_chain(graph: Graph) -> list[str]:
    """The longest path of imports (module A imports B imports C ...), circles taken as one step."""
    in_circle = {member: "|".join(sorted(c)) for c in cycles(graph) for member in c}

    def node_of(module: str) -> str:
        return in_circle.get(module, module)

    condensed: Graph = {}
    for module, targets in graph.items():
        condensed.setdefault(node_of(module), set()).update(
            node_of(t) for t in targets if node_of(t) != node_of(module)
        )

    @cache
    def longest_from(node: str) -> tuple[str, ...]:
        tails = [longest_from(t) for t in sorted(condensed[node])]
        return (node, *max(tails, key=len, default=()))

    return list(max((longest_from(n) for n in sorted(condensed)), key=len))
