"""The layers are a rule: no import cycle between sllmd's packages, the pure cores import no I/O, clock or
device library, and the serving path imports no torch.

Imports are read from the source (every `import` statement, including those under TYPE_CHECKING and inside
functions: a deferred import is still a dependency), so a cycle hidden by a lazy import fails too. The
heavy libraries are also checked in a fresh interpreter, which sees what a module pulls in transitively.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sllmd"
# The pure cores: deterministic code that the simulator and table tests run as it is.
PURE_PREFIXES = ("sllmd.raft.", "sllmd.scheduler.")
PURE_MODULES = frozenset({"sllmd.types", "sllmd.checkpoint.manifest", "sllmd.checkpoint.layout"})
PURE_EDGES = frozenset({"sllmd.raft.lmdb"})  # the raft package's one I/O module: its LMDB storage
FORBIDDEN_IN_PURE = frozenset({"asyncio", "torch", "lmdb", "zmq", "time", "aiohttp", "threading"})
HEAVY = ("asyncio", "torch", "lmdb", "zmq", "aiohttp")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imported_names(module: str) -> Iterator[str]:
    """Every module `module`'s source imports (absolute names; `from a import b` yields a.b when a.b is a
    module of sllmd, else a)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def package_of(module: str) -> str:
    """sllmd.X for a module of subpackage X; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def sllmd_imports(module: str) -> set[str]:
    return {name for name in imported_names(module) if name in MODULES and name != module}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    edges: dict[tuple[str, str], str] = {}  # one module-level witness per package edge, for the message
    for module in MODULES:
        for imported in sllmd_imports(module):
            a, b = package_of(module), package_of(imported)
            if a != b and a != "sllmd" and b != "sllmd":
                graph.setdefault(a, set()).add(b)
                edges.setdefault((a, b), f"{module} -> {imported}")
    cycles = strongly_connected(graph)
    described = [[edges[(a, b)] for a in c for b in c if (a, b) in edges] for c in cycles]
    assert not cycles, f"package cycles: {described}"


def test_no_import_cycle_between_modules():
    graph = {module: sllmd_imports(module) for module in MODULES}
    assert not strongly_connected(graph)


def is_pure(module: str) -> bool:
    return (module.startswith(PURE_PREFIXES) or module in PURE_MODULES) and module not in PURE_EDGES


@pytest.mark.parametrize("module", sorted(m for m in MODULES if is_pure(m)))
def test_a_pure_core_imports_no_io_clock_or_device_library(module):
    """Directly, and through every sllmd module it imports (which must then be pure too)."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        roots = {name.split(".")[0] for name in imported_names(current)}
        assert not roots & FORBIDDEN_IN_PURE, f"{current} (reached from {module}) imports {roots & FORBIDDEN_IN_PURE}"
        todo += [m for m in sllmd_imports(current) if m not in seen and not m.startswith("sllmd.errors")]


def loaded_after_import(modules: list[str]) -> set[str]:
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + (
        "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_the_pure_cores_pull_in_no_heavy_library():
    loaded = loaded_after_import(sorted(m for m in MODULES if is_pure(m)))
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}


def test_the_serving_path_imports_no_torch():
    loaded = loaded_after_import(sorted(m for m in MODULES if m.startswith("sllmd.serving.")))
    assert "torch" not in loaded
