"""Imports follow the data flow (docs/architecture.md): instrumentation imports only core; the
reference workers import instrumentation and core; the collector imports only core; the dashboard
imports only the collector's read facade (``hoptrace.collector.api``) and core. Core itself (the
contract, ids, settings) imports no component; the command line wires them together."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from hoptrace.settings import PROJECT_ROOT

COMPONENTS = ("instrumentation", "workers", "collector", "dashboard", "repair")
#: component -> the hoptrace modules it may import (prefixes), besides core
ALLOWED: dict[str, tuple[str, ...]] = {
    "instrumentation": ("hoptrace.instrumentation",),
    "workers": ("hoptrace.workers", "hoptrace.instrumentation"),
    "collector": ("hoptrace.collector",),
    "dashboard": ("hoptrace.dashboard", "hoptrace.collector.api"),
    "repair": ("hoptrace.repair", "hoptrace.collector.api", "hoptrace.instrumentation"),
}
#: core modules that wire components together: the command line, and the local stack (it starts
#: the reference pipeline's services, named by the workers' registry)
WIRING = {"cli.py", "devstack.py"}


def _imports(path: Path, package: str) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.count(".") > 1 or _component_of(name + ".x") is None:
                yield node.lineno, name  # (a component package itself only through its names)
            for alias in node.names:  # `from hoptrace.collector import api`
                yield node.lineno, f"{name}.{alias.name}"


def _component_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "hoptrace" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in COMPONENTS else None


def test_imports_follow_the_data_flow() -> None:
    found = []
    for component in COMPONENTS:
        folder = PROJECT_ROOT / component
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            package = ".".join(["hoptrace", component, *rel.parts[:-1]])
            for line, name in _imports(path, package):
                other = _component_of(name)
                if other is None or other == component:
                    continue
                if not name.startswith(ALLOWED[component]):
                    found.append(f"{component}/{path.relative_to(folder)}:{line}: {name}")
    assert not found, "imports against the data flow:\n" + "\n".join(found)


def test_core_imports_no_component_outside_the_wiring() -> None:
    found = []
    for path in sorted((PROJECT_ROOT / "core").rglob("*.py")):
        if path.name in WIRING:
            continue
        for line, name in _imports(path, "hoptrace"):
            if _component_of(name) is not None:
                found.append(f"core/{path.relative_to(PROJECT_ROOT / 'core')}:{line}: {name}")
    assert not found, "core importing a component:\n" + "\n".join(found)


def test_only_the_instrumentation_imports_its_speedups() -> None:
    """``_accel`` reaches into libraries' private APIs behind one switch: no handler, no worker,
    no other component imports it."""
    found = []
    for component in COMPONENTS:
        folder = PROJECT_ROOT / component
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            package = ".".join(["hoptrace", component, *rel.parts[:-1]])
            for line, name in _imports(path, package):
                if "._accel" in name and component != "instrumentation":
                    found.append(f"{component}/{path.relative_to(folder)}:{line}: {name}")
    assert not found, "_accel imported outside hoptrace.instrumentation:\n" + "\n".join(found)


#: A product module longer than this says why at its top ("longer than most modules").
MAX_LINES = 500


def test_no_product_module_grows_past_its_size_without_a_reason() -> None:
    found = []
    for folder in ("core", *COMPONENTS):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if text.count("\n") > MAX_LINES and "longer than most" not in text[:3000]:
                found.append(f"{path.relative_to(PROJECT_ROOT)}: {text.count(chr(10))} lines")
    assert not found, "modules past ~500 lines with no reason at the top:\n" + "\n".join(found)
