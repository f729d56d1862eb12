"""The package keeps the shape of docs/architecture.md: checked with the standard library's ast.

Every import of a package module must point down the layers below (never up, never
sideways into another module of the same layer, except within one package such as
`state/`, whose own imports must not form a cycle); nothing imports `cli` or `service`; the
leaves import nothing of ours (`config` only the other leaves). The largest function is
under 60 lines and `service.py` under 300.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "enkwatch"

# top to bottom: a module may import only modules of a lower layer (docs/architecture.md)
LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"service", "taskcmds"},
    {"watchlist"},
    {"ownership", "delivery"},
    {"schedule", "metrics", "sinks", "admin", "demo", "health", "discovery"},
    {"watch", "formats"},
    {"events", "client", "simulator", "statuspage"},
    {"limits", "output", "kinds", "state", "console", "preflight", "livefeed"},
    {"config"},
    {"models", "errors", "clock", "bodies", "redact", "templates"},
]
LEAVES = {"models", "errors", "clock", "bodies", "redact", "templates"}
MAX_FUNCTION_LINES = 60
MAX_SERVICE_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {
        module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def imports_of(tree: ast.Module) -> set[str]:
    """The package modules a module imports (anywhere in it, also inside functions)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "enkwatch":
                out.update(alias.name for alias in node.names if alias.name != "__version__")
            elif node.module.startswith("enkwatch."):
                out.add(node.module.removeprefix("enkwatch."))
        elif isinstance(node, ast.Import):
            out.update(
                a.name.removeprefix("enkwatch.")
                for a in node.names
                if a.name.startswith("enkwatch.")
            )
    return out


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and docs/architecture.md")


def test_every_module_has_a_layer() -> None:
    for name in modules():
        if name != "__init__":
            layer_of(name)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for name, tree in modules().items():
        if name == "__init__":
            continue
        for target in imports_of(tree):
            same_package = name.split(".")[0] == target.split(".")[0]
            if not same_package and layer_of(target) <= layer_of(name):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_nothing_imports_cli_or_service() -> None:
    for name, tree in modules().items():
        if name in ("cli", "__main__"):
            continue
        assert not imports_of(tree) & {"cli", "service"}, name


def test_the_leaves_import_nothing_of_ours() -> None:
    graph = {name: imports_of(tree) for name, tree in modules().items()}
    for leaf in LEAVES:
        assert graph[leaf] == set(), leaf
    assert graph["config"] <= LEAVES


def test_no_import_cycle_inside_a_package() -> None:
    graph = {name: imports_of(tree) for name, tree in modules().items()}

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, " -> ".join([*path, node])
        for target in graph.get(node, ()):
            visit(target, [*path, node])

    for name in graph:
        visit(name, [])


@pytest.mark.parametrize("name", sorted(modules()))
def test_functions_are_short(name: str) -> None:
    tree = modules()[name]
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            assert lines < MAX_FUNCTION_LINES, f"{name}.{node.name}: {lines} lines"


def test_service_only_assembles() -> None:
    lines = (PACKAGE / "service.py").read_text(encoding="utf-8").count("\n")
    assert lines < MAX_SERVICE_LINES
