"""The package's layers (docs/architecture.md): every import points down, and none goes round.

Walks the source of every module with ``ast`` (imports inside functions count: a lazy import
is still a dependency) and checks the rules the layer map states.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.paths import ROOT

PACKAGE = ROOT / "e3relax_ase"

# Bottom to top; a module may import its own room and any room of a lower layer.
LAYERS = (
    ("e3relax_ase", "keys", "config", "distributed"),  # conventions and the torchrun world
    ("geometry",),
    ("nn",),
    ("io",),
    ("relax",),
    ("training", "testing"),
    ("cli",),
    ("__main__",),
)
LAYER_OF = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The top-level room of ``e3relax_ase.X.Y``: X (the package itself for its __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "e3relax_ase"


def imports() -> dict[str, set[str]]:
    """Every module's e3relax_ase imports, resolved to modules of the package."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "e3relax_ase"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "e3relax_ase" and node.level == 0:
                for alias in node.names:  # "from e3relax_ase.io import files" imports the module files
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else resolve(node.module))
        found[name] = targets - {name}
    return found


GRAPH = imports()


def test_the_walker_sees_the_imports_it_checks():
    # Without this a broken walker would pass every rule below.
    assert "e3relax_ase.nn.model" in GRAPH["e3relax_ase.relax.relaxer"]
    assert "e3relax_ase.io.files" in GRAPH["e3relax_ase.io.provenance"] or "e3relax_ase.io.structures" in GRAPH["e3relax_ase.io.provenance"]
    assert "e3relax_ase.relax.sharded" in GRAPH["e3relax_ase.cli.relax_cmd"]  # a lazy import inside a function
    assert all(room(m) in LAYER_OF for m in GRAPH), sorted({room(m) for m in GRAPH} - set(LAYER_OF))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = [
        target
        for target in GRAPH[module]
        if room(target) != room(module) and LAYER_OF[room(target)] >= LAYER_OF[room(module)] and room(target) != "e3relax_ase"
    ]
    assert not upward, f"{module} imports {upward}: a layer may import only the layers below it (docs/architecture.md)"


def test_inference_never_imports_training():
    inference = [m for m in GRAPH if room(m) in ("geometry", "nn", "io", "relax")]
    offenders = {m: sorted(t for t in GRAPH[m] if room(t) == "training") for m in inference}
    assert not {m: t for m, t in offenders.items() if t}


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if target == "e3relax_ase":
                continue  # the package root: __version__ and lazy names, imported by no module at load
            if state.get(target) == 1:
                return path[path.index(target) :] + [target] if target in path else path + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, " -> ".join(cycle)


MAX_MODULE_LINES = 400  # one concept per module: past this, a module is holding two (issue 21)


def test_no_module_outgrows_one_concept():
    sizes = {str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert len(sizes) > 50 and max(sizes.values()) > 300  # the walk saw the package
    assert not {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
