"""The layers of docs/architecture.md, enforced: imports only go down (cli -> facade ->
features -> core -> definitions), and no two modules import each other, directly or through
others. Every import counts: module level, inside functions, and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "maskhub"

#: Top-level parts of the package, lowest layer first (docs/architecture.md).
LAYERS = (
    ("definitions", {"errors", "config", "schemas"}),
    ("infrastructure", {"storage", "checkpoints", "kernels"}),
    ("core", {"core"}),
    ("features", {"diff", "analytics", "hub", "ingest", "training", "demo", "maintenance"}),
    ("facade", {"registry", "torch", "integrations", "__init__"}),
    ("applications", {"study"}),
    ("command line", {"cli", "entry"}),
)
#: Features may use each other only in this order (a feature imports those before it).
FEATURE_ORDER = ("diff", "analytics", "hub", "ingest", "training", "demo", "maintenance")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``maskhub`` module that ``path`` imports (``from maskhub.x import y`` counts as
    ``maskhub.x.y`` when that is a module, else ``maskhub.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("maskhub"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("maskhub"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {_module_name(p): _imports(p) - {_module_name(p)} for p in PACKAGE.rglob("*.py")}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    part = _part(module)
    return next(i for i, (_, parts) in enumerate(LAYERS) if part in parts)


def test_every_part_of_the_package_has_a_layer() -> None:
    known = set().union(*(parts for _, parts in LAYERS))
    assert {_part(m) for m in MODULES} <= known


def test_imports_only_go_down() -> None:
    upward = []
    for module, targets in GRAPH.items():
        for target in targets:
            if target == "maskhub" and _layer(module) < _layer("maskhub"):
                upward.append(f"{module} -> maskhub (import the defining module instead)")
            elif _layer(target) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) -> {target} "
                              f"({LAYERS[_layer(target)][0]})")
            elif _layer(target) == _layer(module) == 3 and \
                    FEATURE_ORDER.index(_part(target)) > FEATURE_ORDER.index(_part(module)):
                upward.append(f"{module} -> {target} (features: {' < '.join(FEATURE_ORDER)})")
    assert upward == []


def test_no_import_cycle() -> None:
    # Tarjan's strongly connected components over the module graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
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
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_tree_matches_the_documented_layers() -> None:
    doc = (PACKAGE.parent.parent / "docs" / "architecture.md").read_text()
    for _, parts in LAYERS:
        for part in parts - {"__init__"}:
            name = f"{part}.py" if (PACKAGE / f"{part}.py").exists() else f"{part}/"
            assert f"`{name}`" in doc, f"docs/architecture.md does not describe {name}"
