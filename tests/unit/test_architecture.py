"""The house rules, checked on the source so the layering cannot quietly erode.

* The library ``pqtunnel/`` is sans-IO: it imports no I/O, thread, process, clock or
  environment module, calls no ``open``, and draws randomness only in ``entropy.py``.
* The library never imports the application (``daemon/``, installed as ``pqtunneld``).
* No import cycles anywhere in the library or the application (``TYPE_CHECKING`` imports
  count: a cycle hidden from the interpreter is still a cycle in the design).
* Installing the project provides no import package named ``daemon`` (PyPI's
  python-daemon owns that name).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "pqtunnel"
APPLICATION = REPO / "daemon"

FORBIDDEN_IN_LIBRARY = {
    "asyncio", "concurrent", "ctypes", "datetime", "fcntl", "httpx", "ifaddr", "io", "logging",
    "multiprocessing", "os", "pathlib", "random", "select", "selectors", "shutil", "signal",
    "socket", "sqlite3", "subprocess", "tempfile", "threading", "time", "trio", "zeroconf",
    "pqtunneld", "daemon", "pqlab",
}
RANDOMNESS = {"secrets"}
RANDOMNESS_HOME = LIBRARY / "entropy.py"
FORBIDDEN_CALLS = {"open", "__import__", "exec", "eval", "input"}


def _modules(root: Path, package: str) -> dict[str, Path]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``module`` imports (absolute names), with line numbers."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    parts = module.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join(anchor + ([name] if name else []))


LIBRARY_MODULES = _modules(LIBRARY, "pqtunnel")
APPLICATION_MODULES = _modules(APPLICATION, "pqtunneld")
ALL_MODULES = {**LIBRARY_MODULES, **APPLICATION_MODULES}


@pytest.mark.parametrize("module", sorted(LIBRARY_MODULES))
def test_the_library_imports_no_io_clock_environment_or_application_module(module: str) -> None:
    path = LIBRARY_MODULES[module]
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for name, line in _imports(module, path)
        if name.split(".")[0] in FORBIDDEN_IN_LIBRARY
        or (name.split(".")[0] in RANDOMNESS and path != RANDOMNESS_HOME)
    ]
    assert not bad, "the library must stay sans-IO:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(LIBRARY_MODULES))
def test_the_library_opens_no_files_and_reads_no_environment(module: str) -> None:
    path = LIBRARY_MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            bad.append(f"{path.relative_to(REPO)}:{node.lineno} calls {node.func.id}()")
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv", "read_text", "write_text",
                                                            "read_bytes", "write_bytes"}:
            bad.append(f"{path.relative_to(REPO)}:{node.lineno} uses .{node.attr}")
    assert not bad, "the library must not touch files or the environment:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in ALL_MODULES.items():
        targets = set()
        for name, _ in _imports(module, path):
            while name and name not in ALL_MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_there_are_no_import_cycles_in_the_library_or_the_application() -> None:
    graph = _graph()
    # A package's __init__ importing its own submodules is how packages export names, not a cycle.
    for module in graph:
        if ALL_MODULES[module].name == "__init__.py":
            graph[module] = {t for t in graph[module] if not t.startswith(module + ".")}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above cannot pass vacuously."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _resolve("pqtunneld.node", False, 1, "config") == "pqtunneld.config"
    assert _resolve("pqtunnel.crypto", True, 2, "errors") == "pqtunnel.errors"


def test_the_application_is_packaged_as_pqtunneld_and_nothing_installs_daemon() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert "daemon" not in setuptools["packages"]
    assert setuptools["package-dir"]["pqtunneld"] == "daemon"
    probe = "import importlib.util as u; print(u.find_spec('daemon') is None, u.find_spec('pqtunneld') is not None)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", check=True)
    assert result.stdout.split() == ["True", "True"]


def test_lab_helpers_are_not_part_of_the_product() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert not any(p.startswith("pqlab") for p in project["tool"]["setuptools"]["packages"])
    assert not (APPLICATION / "netlab.py").exists() and not (APPLICATION / "process.py").exists()
