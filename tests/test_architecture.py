"""The package's architecture as a test: layers import only leftwards, no import circles, small constructors.

Layers, lowest first (``transport → dht → groups → codecs → collectives → train → cli``); a module may import its
own layer and the ones below it, at module level, under ``TYPE_CHECKING`` or inside a function alike. The package
root (``__version__``), ``errors`` and ``config`` sit below every layer. Read from the sources with ``ast``: nothing
is imported, so this runs in milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import legion_swarm

ROOT = Path(legion_swarm.__file__).parent
PACKAGE = "legion_swarm"

LAYERS: dict[str, int] = {
    "": 0,  # the package root: only __version__ is imported from it inside the package
    "errors": 0,
    "config": 0,
    "transport": 1,
    "dht": 2,
    "groups": 3,
    "peer": 4,  # a member: host, DHT, membership and RTT probing together
    "codecs": 5,
    "collectives": 6,
    "train": 7,
    "sim": 8,  # local swarms of real processes, and the chaos harness on top of them
    "chaos": 8,
    "cli": 9,
    "__main__": 9,
}
MAX_INIT_PARAMS = 8


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([PACKAGE, *parts])] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    assert first in LAYERS, f"{module} belongs to no layer: add its package to LAYERS"
    return LAYERS[first]


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a ``legion_swarm`` module, wherever it stands."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                name = f"{base}.{alias.name}"
                out.append((name if name in MODULES else base, node.lineno))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_imports_only_point_to_the_same_layer_or_below() -> None:
    climbing = [
        f"{module}:{line} imports {target}"
        for module, targets in GRAPH.items()
        for target, line in targets
        if target in MODULES and _layer(target) > _layer(module)
    ]
    assert not climbing, "imports that climb a layer:\n" + "\n".join(climbing)


def test_no_import_circles() -> None:
    """Depth-first search for a back edge in the module graph (package ``__init__`` re-exports count as edges)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target, _ in GRAPH.get(module, ()):
            if target == module or target not in MODULES:
                continue
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)
    # A package's __init__ re-exporting its submodules, which import siblings through the package, is no circle
    # of meaning; only circles between modules are reported.
    real = sorted({c for c in circles if not _through_own_init(c)})
    assert not real, "import circles:\n" + "\n".join(real)


def _through_own_init(circle: str) -> bool:
    chain = circle.split(" -> ")
    return any(m in MODULES and MODULES[m].name == "__init__.py" and all(n.startswith(m) for n in chain) for m in chain)


def test_no_constructor_takes_more_than_eight_parameters() -> None:
    """Explicit ``__init__`` methods only: frozen config and record dataclasses are value objects, built by keyword."""
    big = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        a = item.args
                        count = len(a.posonlyargs) + len(a.args) - 1 + len(a.kwonlyargs)
                        count += (a.vararg is not None) + (a.kwarg is not None)
                        if count > MAX_INIT_PARAMS:
                            big.append(f"{module}.{node.name}.__init__: {count} parameters")
    assert not big, "constructors over 8 parameters:\n" + "\n".join(big)
