"""The redrive tests' stack: the reference services and the real collector (with the redrive
route: ``HOPTRACE_REDRIVE_TOKEN`` set), as ``tests/diagnosis/test_e2e_causes.py`` starts them;
plus the checks every redrive test makes (one row per business table, the traces linked, a
second redrive sends nothing)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from hoptrace.contract.conventions import ATTR_REDRIVE_ORIGIN_TRACE, BAGGAGE_KEY
from tests.diagnosis.test_e2e_causes import Stack
from tests.support import wait_for
from tests.workers.harness import HOPTRACE

TOKEN = "redrive-test-token"
#: Every business table of the reference pipeline (one row per payment each).
TABLES = ("payments", "student_course_purchases", "trainer_allocations", "tutoring_sessions")


@contextmanager
def redrive_token() -> Iterator[None]:
    """``HOPTRACE_REDRIVE_TOKEN`` in the environment the stack's processes inherit."""
    old = os.environ.get("HOPTRACE_REDRIVE_TOKEN")
    os.environ["HOPTRACE_REDRIVE_TOKEN"] = TOKEN
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HOPTRACE_REDRIVE_TOKEN", None)
        else:
            os.environ["HOPTRACE_REDRIVE_TOKEN"] = old


async def dry_run(stack: Stack, cid: str) -> tuple[int, dict[str, Any]]:
    """A dry run in process (the library call ``hoptrace redrive ID`` makes; cheaper than a
    subprocess): (exit code, report)."""
    from hoptrace.repair.runner import Ask, run

    report = await run(Ask(ids=(cid,)), settings=stack.settings(), spec=stack.spec)
    return report.exit_code, report.to_dict()


def redrive(
    stack: Stack, *args: str, apply: bool = True, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """``hoptrace redrive ARGS [--apply] --format json``: (exit code, report)."""
    cmd = [HOPTRACE, "redrive", *args, "--format", "json", *(["--apply"] if apply else [])]
    res = subprocess.run(
        cmd,
        env={**stack.env, "HOPTRACE_REDRIVE_WHO": "test", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode in (0, 1), (res.returncode, res.stderr)
    return res.returncode, json.loads(res.stdout)


def trace_text(stack: Stack, cid: str) -> str:
    """``hoptrace trace ID`` (text)."""
    res = subprocess.run(
        [HOPTRACE, "trace", cid], env=stack.env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def actions(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for p in report["payments"] for a in p["actions"]]


async def rows(db_url: str, cid: str) -> dict[str, int]:
    conn = await asyncpg.connect(db_url)
    try:
        return {
            t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE correlation_id = $1", cid)  # noqa: S608
            for t in TABLES
        }
    finally:
        await conn.close()


async def assert_one_row_each(stack: Stack, cid: str) -> None:
    assert await rows(stack.db_url, cid) == dict.fromkeys(TABLES, 1)


async def assert_linked(stack: Stack, cid: str, sent: dict[str, Any], origin: set[str]) -> None:
    """The redrive's span is stored in a new trace, links the original trace (its attribute
    names it; the span link itself is checked in ``test_apply_span``), and the redriven step's
    new run is in the redrive's trace."""
    trace_id = sent["trace_id"]
    assert trace_id and trace_id not in origin

    async def spans() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(stack.db_url)
        try:
            return await conn.fetch(
                "SELECT name, step, attributes, correlation_id FROM spans WHERE trace_id = $1",
                trace_id,
            )
        finally:
            await conn.close()

    def ready(got: list[asyncpg.Record]) -> bool:
        names = {r["name"] for r in got}
        return f"redrive {sent['step']}" in names and any(r["step"] == sent["step"] for r in got)

    got = await wait_for(
        lambda: _when(spans(), ready), timeout=30, interval=0.3, what="the new attempt's span"
    )
    span = next(r for r in got if r["name"] == f"redrive {sent['step']}")
    attrs = (
        json.loads(span["attributes"])
        if isinstance(span["attributes"], str)
        else span["attributes"]
    )
    assert attrs[ATTR_REDRIVE_ORIGIN_TRACE] in origin, attrs
    assert attrs.get(BAGGAGE_KEY, span["correlation_id"]) == cid


async def _when(coro: Any, check: Any) -> Any:
    value = await coro
    return value if check(value) else None


def sent_actions(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in actions(report) if a["result"] == "sent"]


async def second_redrive_sends_nothing(stack: Stack, cid: str) -> dict[str, Any]:
    code, again = redrive(stack, cid)
    assert code == 0, again
    assert again["summary"]["sent"] == 0 and not any(a["sends"] for a in actions(again)), again
    return again


def run(coro: Any) -> Any:
    return asyncio.run(coro)
