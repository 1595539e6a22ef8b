"""The package's layering: imports only run down.

The layers: core -> decision -> middleware -> sinks -> integration -> face.

Every module under ``oodmon/`` is parsed (not imported) and each ``oodmon`` import it makes,
function-local ones included, is checked against the layer table below. A new module must be
given a layer here; the label-queue and CLI packages are whole layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "oodmon"

LAYERS = ("core", "decision", "middleware", "sinks", "integration", "face")

#: Module (or package prefix) -> layer. The longest matching prefix wins.
LAYER_OF = {
    "oodmon.errors": "core",
    "oodmon.ocs": "core",
    "oodmon.scores": "core",
    "oodmon.conformal": "core",
    "oodmon._printable": "core",
    "oodmon._atomic": "core",
    "oodmon._lazy_exports": "core",
    "oodmon._scratch": "core",
    "oodmon._fused": "core",
    "oodmon._native": "core",
    "oodmon._native_scores": "core",
    "oodmon.detector": "decision",
    "oodmon.verdict": "decision",
    "oodmon.monitor": "middleware",
    "oodmon.wrapping": "middleware",
    "oodmon.sinks": "middleware",
    "oodmon._batcher": "middleware",
    "oodmon._lifecycle": "middleware",
    "oodmon._output_checks": "middleware",
    "oodmon._flag_window": "middleware",
    "oodmon.metrics": "sinks",
    "oodmon._batch_histogram": "sinks",
    "oodmon.label_queue": "sinks",
    "oodmon.oip": "integration",
    "oodmon.events": "integration",
    "oodmon.sidecar": "integration",
    "oodmon.sidecar._http": "integration",
    "oodmon.sidecar.app": "integration",
    "oodmon.sidecar.metrics": "integration",
    "oodmon.sidecar.routes": "integration",
    "oodmon.sidecar.scoring": "integration",
    "oodmon.offline": "integration",
    "oodmon.consume": "integration",
    "oodmon.consume.config": "integration",
    "oodmon.consume.consumer": "integration",
    "oodmon.consume.decode": "integration",
    "oodmon.consume.metrics": "integration",
    "oodmon.cli": "face",
    "oodmon.demo": "face",
    "oodmon": "face",  # the package's __init__: the public API re-exports every layer
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
# compiled extensions, known by their type stubs (which import nothing of oodmon's)
MODULES.update(
    {module_name(p): p for p in sorted(ROOT.rglob("*.pyi")) if not p.with_suffix(".py").exists()}
)


def layer(module: str) -> str:
    matches = [key for key in LAYER_OF if module == key or module.startswith(key + ".")]
    if not matches:
        raise AssertionError(f"{module} has no layer: add it to LAYER_OF in {__file__}")
    return LAYER_OF[max(matches, key=len)]


def resolve(name: str) -> str:
    """The oodmon module an imported dotted name lives in (a name inside a module -> module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    """The oodmon modules ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "oodmon" or name.startswith("oodmon."):
                target = resolve(name)
                if target != module:
                    found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}

CYCLE_GRAPH: dict[str, set[str]] = {}
for _module, _targets in GRAPH.items():
    CYCLE_GRAPH[_module] = {t for t in _targets if t != _module}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_run_down(module: str) -> None:
    own = LAYERS.index(layer(module))
    upward = {
        target: layer(target) for target in GRAPH[module] if LAYERS.index(layer(target)) > own
    }
    assert not upward, f"{module} ({layer(module)}) imports up the layering: {upward}"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(CYCLE_GRAPH[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(CYCLE_GRAPH):
        if module not in state:
            visit(module)


def test_the_checker_sees_an_upward_import() -> None:
    assert "oodmon.detector" in GRAPH["oodmon.monitor"]  # a real downward import is seen
    assert layer("oodmon.label_queue.writer") == "sinks"
    assert layer("oodmon.sidecar") == "integration"
    assert layer("oodmon.cli.queue") == "face"
    assert LAYERS.index(layer("oodmon.metrics")) > LAYERS.index(layer("oodmon.monitor"))
