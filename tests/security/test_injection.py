"""Injection strings through every entry point (CLI ``trace``, the dashboard's ``?id=``, the
payment-service and admin-service HTTP APIs, the collector's OTLP receiver): each is refused with
a clear error or stored verbatim as data, and no statement ran (see conftest: canary + snapshot
of every table's row count and the table list, identical before and after)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from benchmarks.otlp_fuzz import CollectorProc, valid_request
from hoptrace.cli import app as cli_app
from hoptrace.dashboard.serve import APP
from tests.support import delete_topics
from tests.workers.harness import HOPTRACE, Services, service_env

from .conftest import CANARY_ROWS, INJECTIONS, snapshot

#: Well-formed ids (they pass validation and reach the queries) that would break a spliced query.
HOSTILE_BUT_VALID = ["x--", "1.0:OR-1", "a_b.c:d-e", "0" * 128]


@dataclass
class Rig:
    db_url: str
    env: dict[str, str]
    services: Services
    collector: CollectorProc

    def url(self, name: str) -> str:
        key = {"payment-service": "PAYMENT", "admin-service": "ADMIN"}[name]
        return f"http://127.0.0.1:{self.env[f'HOPTRACE_{key}_SERVICE_PORT']}"


@pytest.fixture
def rig(
    canary: str,
    kafka_bootstrap: str,
    spec_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Rig]:
    env = service_env(canary, kafka_bootstrap, spec_path, None)
    res = subprocess.run([HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    collector = CollectorProc(canary, spec_path, tmp_path)
    collector.start()
    services = Services(env, tmp_path)
    try:
        services.start("admin-service")
        services.start("payment-service")
        for k in ("HOPTRACE_DATABASE_URL", "HOPTRACE_KAFKA_BOOTSTRAP", "HOPTRACE_PIPELINE"):
            monkeypatch.setenv(k, env[k])
        # the dashboard reads as hoptrace_ro (its URL is never derived from the owner's)
        base, _, rest = canary.partition("://")
        ro = f"{base}://hoptrace_ro:hoptrace_ro@{rest.split('@', 1)[1]}"
        monkeypatch.setenv("HOPTRACE_DASHBOARD_DATABASE_URL", ro)
        from hoptrace.settings import get_settings

        get_settings.cache_clear()
        yield Rig(canary, env, services, collector)
    finally:
        services.stop_all()
        collector.stop()
        from hoptrace.contract import load_spec

        asyncio.run(delete_topics(kafka_bootstrap, load_spec(spec_path).topics))
        from hoptrace.settings import get_settings

        get_settings.cache_clear()


async def _legit_writes(rig: Rig) -> None:
    """Injection strings as DATA where an entry point legitimately writes: stored verbatim."""
    hostile = INJECTIONS[0]
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(
            f"{rig.url('admin-service')}/allocations",
            json={"correlation_id": "sec-legit-1", "student": hostile, "course": INJECTIONS[1]},
        )
        assert r.status_code == 200, r.text
        # OTLP: injection strings in every text field of a span
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        req = ExportTraceServiceRequest.FromString(valid_request(random.Random(3), spans=1))
        span = req.resource_spans[0].scope_spans[0].spans[0]
        span.name = hostile
        span.attributes[0].value.string_value = hostile  # hoptrace.correlation_id
        r = await client.post(
            f"{rig.collector.http}/v1/traces",
            content=req.SerializeToString(),
            headers={"content-type": "application/x-protobuf"},
        )
        assert r.status_code == 200, r.text
    conn = await asyncpg.connect(rig.db_url)
    try:
        student = await conn.fetchval(
            "SELECT student FROM trainer_allocations WHERE correlation_id = 'sec-legit-1'"
        )
        assert student == hostile
        for _ in range(100):
            row = await conn.fetchrow(
                "SELECT correlation_id, attributes FROM spans WHERE name = $1", hostile
            )
            if row:
                break
            await asyncio.sleep(0.1)
        assert row is not None, "the OTLP span was not stored"
        assert row["correlation_id"] is None  # not in the id format: kept, not indexed
        assert json.loads(row["attributes"])["hoptrace.correlation_id"] == hostile
    finally:
        await conn.close()


def test_injection_strings_run_no_statement(rig: Rig) -> None:
    asyncio.run(_legit_writes(rig))
    before = asyncio.run(snapshot(rig.db_url))
    assert before.canary == sorted(CANARY_ROWS)

    # CLI: malformed ids are refused before any query (exit 2, a clear message)
    runner = CliRunner()
    for inj in INJECTIONS:
        res = runner.invoke(cli_app, ["trace", inj, "--format", "json"])
        assert res.exit_code == 2, (inj, res.output)
        assert "not a valid correlation id" in res.output, (inj, res.output)
    # ... and well-formed hostile ids reach the (parameterised) queries: unknown, no SQL error
    for cid in HOSTILE_BUT_VALID:
        res = runner.invoke(cli_app, ["trace", cid, "--format", "json"])
        assert res.exit_code == 2, (cid, res.output)
        assert "no payment with id" in res.output, (cid, res.output)
    res = subprocess.run(
        [HOPTRACE, "trace", INJECTIONS[0]], env=rig.env, capture_output=True, text=True
    )
    assert res.returncode == 2 and "not a valid correlation id" in res.stderr, res.stderr

    # dashboard: ?id= with injection strings shows the refusal, never an exception
    for inj in [*INJECTIONS[:6], INJECTIONS[11], "x--"]:
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["id"] = inj
        at.run()
        assert not at.exception, (inj, at.exception)
        errors = " ".join(str(e.value) for e in at.error)
        expect = "not a valid correlation id" if inj != "x--" else "x--"
        assert expect in errors, (inj, errors)

    # HTTP APIs: refused (422) or not found (404), never 500, nothing written
    async def http_attacks() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            for inj in INJECTIONS:
                r = await client.post(
                    f"{rig.url('payment-service')}/payments",
                    json={"student": inj, "course": "course-1", "amount": "10.00"},
                )
                assert r.status_code in (404, 422), (inj, r.status_code, r.text)
                r = await client.post(
                    f"{rig.url('payment-service')}/payments",
                    json={"student": "student-1", "course": inj, "amount": "10.00"},
                )
                assert r.status_code in (404, 422), (inj, r.status_code, r.text)
                r = await client.post(
                    f"{rig.url('admin-service')}/allocations",
                    json={"correlation_id": inj, "student": "s", "course": "c"},
                )
                assert r.status_code == 422, (inj, r.status_code, r.text)
                assert "not a valid correlation id" in r.text, r.text
                r = await client.get(f"{rig.collector.http}/healthz", params={"id": inj})
                assert r.status_code == 200
            # regressions: a NUL character and a deeply nested body were answered 500
            for name, path in (("payment-service", "/payments"), ("admin-service", "/allocations")):
                r = await client.post(
                    rig.url(name) + path,
                    json={"correlation_id": "c-1", "student": "a\x00b", "course": "c"},
                )
                assert r.status_code == 422 and "NUL" in r.text, (name, r.status_code, r.text)
                r = await client.post(
                    rig.url(name) + path,
                    content=b"[" * 100_000,
                    headers={"content-type": "application/json"},
                )
                assert r.status_code == 422 and "nested" in r.text, (name, r.status_code)

    asyncio.run(http_attacks())

    after = asyncio.run(snapshot(rig.db_url))
    assert after == before, (before, after)


# ------------------------------------------------------------------ user text printed as text
#: What a span's status message may carry from a hostile or careless service: ANSI escapes (colour,
#: cursor moves, a hyperlink, a window title), C0 and C1 controls, a carriage return that would
#: overwrite the line it is on, a bell.
CONTROLLED = (
    "boom \x1b[31mred\x1b[0m \x1b[2J\x1b[H\x1b]8;;http://evil.test\x07link\x1b]8;;\x07 "
    "\x1b]0;title\x07\r\x07\x08\x00\x0b\x0c\x7f\x85\x9b31mC1\x9d csi"
)
#: Characters that must not reach a terminal: C0 except the layout's newlines, DEL, C1, ESC.
_FORBIDDEN = {*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0))} - {"\n"}


def _hostile_diagnosis(cid: str):
    from datetime import UTC, datetime, timedelta

    from hoptrace.collector.diagnosis import Evidence, SpanRecord, diagnose
    from hoptrace.contract import load_spec
    from hoptrace.settings import PROJECT_ROOT

    spec = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
    first, second = spec.steps[0], spec.steps[1]
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    spans = (
        SpanRecord(
            "a" * 32, "1" * 16, first.id, first.service, t0, t0, step=first.id, outcome="ok",
            attributes={"hoptrace.emit.topic": first.emits, "hoptrace.emit.partition": 0},
        ),
        SpanRecord(
            "a" * 32, "2" * 16, second.id, second.service, t0 + timedelta(seconds=1),
            t0 + timedelta(seconds=2), status_code=2, status_message=CONTROLLED,
            step=second.id, outcome="error",
        ),
    )  # fmt: skip
    return diagnose(spec, Evidence(cid, spans=spans), t0 + timedelta(seconds=3))


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_trace_prints_no_control_characters_from_span_data(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hoptrace trace` prints a span's status message (evidence, next action): whatever control
    characters and escape sequences it holds never reach the terminal."""
    from hoptrace.collector import api

    async def lookup(cid: str, **_: object):
        return _hostile_diagnosis(cid)

    async def nothing_to_close() -> None:
        return None

    monkeypatch.setattr(api, "diagnose", lookup)
    monkeypatch.setattr(api, "close", nothing_to_close)
    res = CliRunner().invoke(cli_app, ["trace", "pay-ctl-1", "--format", fmt])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "processing_error" in out
    assert not _FORBIDDEN & set(out), sorted({hex(ord(c)) for c in _FORBIDDEN & set(out)})
    if fmt == "json":  # escaped, not dropped: the data is there, as data
        assert json.loads(out)["steps"][1]["evidence"][0].endswith(CONTROLLED)
    else:
        assert "boom" in out and "red" in out and "C1" in out  # the words themselves are kept


def _rendered(markdown: str) -> str:
    """The HTML a CommonMark renderer (with GFM's strikethrough, as Streamlit's) makes of
    ``markdown``. (GFM's bare-URL autolinks are checked on the text: see below.)"""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("strikethrough").render(markdown)


@pytest.mark.parametrize(
    "raw",
    [
        "[click here](http://evil.test/login)",
        "![pixel](http://evil.test/p.png)",
        "see http://evil.test/x and www.evil.test",
        "<a href='http://evil.test'>x</a> **loud** _it_ `code` # head",
        ":red[alarm] $x^2$ ~~gone~~",
    ],
)
def test_dashboard_shows_a_malformed_id_as_text_not_markdown(raw: str) -> None:
    """The lookup page's message for a malformed ``?id=`` quotes the raw text: it must read as
    that text (no link, image, emphasis or HTML made of it)."""
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["id"] = raw
    at.run()
    assert not at.exception, at.exception
    [error] = [str(e.value) for e in at.error]
    assert "not a valid correlation id" in error
    html = _rendered(error)
    for made in ("<a ", "<img", "<strong>", "<em>", "<code>", "<h1", "<s>", "<del>"):
        assert made not in html, (raw, error, html)
    for bare in ("http://", "www."):  # GFM would link these: they must come escaped
        assert bare not in error, error
    assert "$" not in error.replace("\\$", ""), error  # no LaTeX delimiter left active
    assert "red[" not in error, error  # no Streamlit colour directive (its bracket escaped)
