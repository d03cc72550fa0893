"""The package's modules import each other without a cycle: the graph of every import statement
of src/ptqrepro (those inside functions too, which only postpone a cycle), read with ``ast``, is
acyclic; and each module imports on its own, first, in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ptqrepro"


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str], source: str | None = None) -> set[str]:
    """The package's modules that module ``name`` imports: for ``from a.b import c``, ``a.b.c``
    where that is a module, else ``a.b``; relative imports resolved (``source``: the text, if not
    the file's). A submodule importing one
    of the packages it lives in is left out: Python has begun that package before the submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {target for target in targets if target in known and not name.startswith(f"{target}.") and target != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (first repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_is_read_and_a_cycle_is_found():
    graph = import_graph()
    assert {"ptqrepro.recipe.steps", "ptqrepro.methods.gptq"} <= graph["ptqrepro.recipe.recipes"] | graph["ptqrepro.recipe.steps"]
    assert {"ptqrepro.recipe.recipes", "ptqrepro.layerwise.pipeline"} <= graph["ptqrepro.peers"] | graph["ptqrepro.peers.recipes"]
    assert "ptqrepro.formats.base" in graph["ptqrepro.formats.integer"]
    relative = "from . import base\nfrom .. import errors\nfrom ..models.adapters import Architecture\n"
    assert imported("ptqrepro.formats.x", Path("x.py"), set(graph), relative) == {
        "ptqrepro.formats.base", "ptqrepro.errors", "ptqrepro.models.adapters"}
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    # the cycle this test was written against: recipes -> peers -> pipeline -> recipes
    assert cycle({**graph, "ptqrepro.recipe.recipes": graph["ptqrepro.recipe.recipes"] | {"ptqrepro.peers"}}) is not None


def test_the_package_has_no_import_cycle():
    found = cycle(import_graph())
    assert found is None, "import cycle: " + " -> ".join(found)


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}

    def run(name: str) -> tuple[str, subprocess.CompletedProcess]:
        return name, subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = {name: result.stderr.strip().splitlines()[-1] for name, result in pool.map(run, modules())
                  if result.returncode != 0}
    assert not failed, failed
