"""The contract lives in one module: no product module spells one of its literals, and the
collector and the dashboard name nothing of the reference pipeline (they learn it from the spec).

Both checks read the product's source (string constants, f-string pieces included; docstrings
left out) and fail naming the file, the line and the literal.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

from hoptrace.contract import causes, conventions, load_spec
from hoptrace.settings import PROJECT_ROOT

from ..support import REFERENCE_SPEC

#: SQL words a table name follows (the reference tables may not be named in collector SQL).
SQL_NAMING = r"(?:FROM|INTO|JOIN|UPDATE|TABLE)"
PRODUCT = ("core", "instrumentation", "workers", "collector", "dashboard", "repair")
CONTRACT = PROJECT_ROOT / "core" / "contract"

#: Contract literals that are also ordinary words with another meaning somewhere; each entry is
#: (file, literal): why it is not the contract's.
ELSEWHERE: dict[tuple[str, str], str] = {
    ("workers/http.py", "error"): "the key of an HTTP JSON error body",
    ("workers/payment_service.py", "ok"): "healthz body",
    ("workers/admin_service.py", "ok"): "healthz body",
    ("core/devstack.py", "kafka"): "the local stack's part name",
    ("workers/http.py", "receive"): "ASGI message type (the middleware's per-message spans)",
    ("workers/http.py", "send"): "ASGI message type (the middleware's per-message spans)",
    ("repair/runner.py", "error"): "the key of a payment's failure in redrive's JSON report",
}


def _docstrings(tree: ast.AST) -> set[int]:
    """Docstrings and the names listed in ``__all__`` (names of code, not values)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            ids.update(id(n) for n in ast.walk(node.value) if isinstance(n, ast.Constant))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _strings(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def _product_files() -> Iterator[Path]:
    for folder in PRODUCT:
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            if CONTRACT not in path.parents:
                yield path


def _contract_literals() -> set[str]:
    out: set[str] = set()
    for name, value in vars(conventions).items():
        if name.isupper() and isinstance(value, str):
            out.add(value)
        if name.isupper() and isinstance(value, tuple | frozenset):
            out.update(v for v in value if isinstance(v, str))
    for value in vars(conventions.Operation).values():
        if isinstance(value, str) and not value.startswith("_"):
            out.add(value)
    for enum in (causes.Cause, causes.StepStatus, causes.State, causes.Outcome):
        assert issubclass(enum, Enum)
        out.update(m.value for m in enum)
    # the product's own name is also the local stack's database, role and user name
    out.discard(conventions.DISTRO_NAME)
    return out


def test_the_literal_scan_finds_a_planted_literal(tmp_path: Path) -> None:
    planted = tmp_path / "m.py"
    planted.write_text('"""doc: hoptrace.step"""\nX = f"{1}.dlq"\nY = "hoptrace.step"\n')
    found = [s for _, s in _strings(planted)]
    assert "hoptrace.step" in found and ".dlq" in found
    assert found.count("hoptrace.step") == 1  # the docstring is not code


def test_no_product_module_spells_a_contract_literal() -> None:
    literals = _contract_literals()
    assert "hoptrace.correlation_id" in literals and "marked_without_effect" in literals
    found = []
    for path in _product_files():
        rel = path.relative_to(PROJECT_ROOT).as_posix()
        for line, text in _strings(path):
            if text in literals and (rel, text) not in ELSEWHERE:
                found.append(f"{rel}:{line}: {text!r}")
    assert not found, "contract literals outside hoptrace.contract:\n" + "\n".join(found)


def _reference_names() -> set[str]:
    spec = load_spec(REFERENCE_SPEC)
    names: set[str] = set()
    for step in spec.steps:
        names.update(v for v in (step.id, step.service, step.consumes, step.group, step.emits) if v)
        names.update(v for v in (step.event_type, step.calls) if v)
    from hoptrace.workers import faults
    from hoptrace.workers.registry import FAULTS

    names.update(f for allowed in FAULTS.values() for f in allowed)
    names.update(FAULTS)
    names.add(faults.WRONG_GROUP_SUFFIX)
    return names


def test_collector_and_dashboard_name_nothing_of_the_reference_pipeline() -> None:
    names = _reference_names()
    tables = {s.table for s in load_spec(REFERENCE_SPEC).steps if s.table}
    assert {"admin-service", "PURCHASE_CREATED", "wrong-group"} <= names
    found = []
    for folder in ("collector", "dashboard"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            rel = path.relative_to(PROJECT_ROOT).as_posix()
            for line, text in _strings(path):
                hits = sorted(n for n in names if n in text)
                hits += [t for t in tables if re.search(rf"\b{SQL_NAMING}\s+{t}\b", text, re.I)]
                if hits:
                    found.append(f"{rel}:{line}: {', '.join(hits)} in {text[:60]!r}")
    assert not found, "reference-pipeline names in collector/dashboard:\n" + "\n".join(found)
