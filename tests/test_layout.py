"""The package's layout keeps its rules: read from every import statement of the source,
function-level ones included (``bench/import_graph.py``, which ``bench/layout.py`` reports from)."""

from __future__ import annotations

import ast
import sys

import pytest

from flhf_core.config import PYPROJECT

sys.path.insert(0, str(PYPROJECT.parent / "bench"))
from import_graph import cycles, import_graph, module_names

PACKAGE_DIR = PYPROJECT.parent / "flhf_core"
FOLDERS = ("server", "client", "learning", "users", "data", "results", "runs")
SHARED = {"flhf_core", "flhf_core.config", "flhf_core.protocol", "flhf_core.common"}

# folder -> the folders its modules must never import
FORBIDDEN = {
    "client": {"server"},
    "server": {"client"},
    "learning": {"server", "client", "runs", "results"},
    "users": {"server", "client", "runs", "results", "learning"},
    "data": {"server", "client", "runs", "results"},
    "results": {"server", "client"},
}


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else None


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        forbidden = FORBIDDEN.get(folder_of(module) or "", set())
        found += [f"{module} imports {t}" for t in sorted(targets) if folder_of(t) in forbidden]
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIR)


def test_the_package_has_no_import_circles(graph):
    assert cycles(graph) == []


def test_no_folder_imports_a_folder_it_must_not(graph):
    assert violations(graph) == []


def test_the_rules_catch_a_forbidden_import_and_a_circle(tmp_path):
    """The checks above can fail: a client module importing the server, and a circle."""
    package = tmp_path / "flhf_core"
    for folder in ("client", "server"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text('"""A folder."""\n')
    (package / "__init__.py").write_text("")
    (package / "client" / "handlers.py").write_text("def f():\n    from flhf_core.server import strategy\n")
    (package / "server" / "strategy.py").write_text("from ..client.handlers import f\n")
    graph = import_graph(package)
    assert violations(graph) == [
        "flhf_core.client.handlers imports flhf_core.server.strategy",
        "flhf_core.server.strategy imports flhf_core.client.handlers",
    ]
    assert cycles(graph) == [{"flhf_core.client.handlers", "flhf_core.server.strategy"}]


def test_only_the_shared_modules_stand_at_the_top():
    names = module_names(PACKAGE_DIR)
    assert {m for m in names if folder_of(m) is None} == SHARED


def test_each_folder_says_what_it_holds():
    for folder in FOLDERS:
        docstring = ast.get_docstring(ast.parse((PACKAGE_DIR / folder / "__init__.py").read_text()))
        assert docstring and len(docstring) > 80, folder


def test_the_simulated_users_need_no_torch():
    for path in (PACKAGE_DIR / "users").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in {"torch", "transformers"} for n in names), path.name
