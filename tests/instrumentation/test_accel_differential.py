"""The speed-ups change no span: the same hops (``accel_scenario``: a producer-only step and two
hops with a handler DB write, an HTTP call, an emit, a retried failure and a dead-letter) run
once with ``HOPTRACE_ACCEL=1`` and once with ``HOPTRACE_ACCEL=0``, each in its own process
exporting over OTLP/gRPC to a receiver here; the received spans are compared field by field:
names, kinds, parents (tree shape), attributes, events, links, status, flags, resource, scope.
Ids and timestamps are left out; the run's topic suffix, which differs, is replaced.

The accelerated run must really be accelerated (its log says no speed-up is off) and the plain
run really plain (its log names every speed-up as off)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from hoptrace.contract import conventions as c
from hoptrace.contract import load_spec
from hoptrace.instrumentation._accel import Speedup, why_off
from hoptrace.settings import PROJECT_ROOT

from ..support import create_topics, delete_topics, isolated_spec, unique
from .accel_scenario import PAYMENTS
from .helpers import create_tables
from .otlp_receiver import GrpcReceiver


class Admin:
    """The stand-in downstream service: per run, the first payment's first call answers 503,
    later calls 200 with a trainer; the second payment's calls answer 400."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                cid = body["correlation_id"]
                outer.calls[cid] += 1
                if cid.startswith("diff-bad"):
                    status, out = 400, {"detail": "no such course"}
                elif outer.calls[cid] == 1:
                    status, out = 503, {"detail": "busy"}
                else:
                    status, out = 200, {"trainer": "t-1"}
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def admin() -> Iterator[Admin]:
    server = Admin()
    yield server
    server.close()


def _plain(value: Any, suffix: str) -> Any:
    """A value with the run's topic suffix replaced (strings, lists, dicts)."""
    if isinstance(value, str):
        return value.replace(suffix, "<suffix>")
    if isinstance(value, list):
        return [_plain(v, suffix) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, suffix) for k, v in value.items()}
    return value


def _attrs(items: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    """OTLP key-values as {key: [value kind, value]} (the kind is compared too)."""
    return {
        a["key"]: _plain([[k, v] for k, v in a.get("value", {}).items()], suffix) for a in items
    }


def normalise(requests: list[ExportTraceServiceRequest], suffix: str) -> list[str]:
    """Every received span as one comparable line (sorted): everything but ids and times, the
    parent and each link given as the path of names (and correlation ids) from the root."""
    spans: dict[str, dict[str, Any]] = {}
    for request in requests:
        doc = MessageToDict(request, preserving_proto_field_name=True)
        for rs in doc.get("resource_spans", []):
            resource = _attrs(rs.get("resource", {}).get("attributes", []), suffix)
            resource.pop("service.instance.id", None)  # an id: new in every process
            for ss in rs.get("scope_spans", []):
                scope = {
                    "name": ss.get("scope", {}).get("name"),
                    "version": ss.get("scope", {}).get("version"),
                    "attributes": _attrs(ss.get("scope", {}).get("attributes", []), suffix),
                    "schema_url": ss.get("schema_url"),
                }
                for s in ss.get("spans", []):
                    spans[s["span_id"]] = {"span": s, "resource": resource, "scope": scope}

    def label(span_id: str | None) -> str:
        if not span_id:
            return ""
        found = spans.get(span_id)
        if found is None:
            return "<not exported>"
        s = found["span"]
        cid = _attrs(s.get("attributes", []), suffix).get(c.ATTR_CORRELATION_ID, [[0, None]])[0][1]
        return f"{label(s.get('parent_span_id'))} / {_plain(s['name'], suffix)} [{cid}]"

    out = []
    for found in spans.values():
        s = found["span"]
        line = {
            "name": _plain(s["name"], suffix),
            "kind": s.get("kind"),
            "parent": label(s.get("parent_span_id")),
            "trace_state": s.get("trace_state"),
            "flags": s.get("flags"),
            "attributes": _attrs(s.get("attributes", []), suffix),
            "dropped_attributes": s.get("dropped_attributes_count"),
            "events": [
                {"name": e["name"], "attributes": _attrs(e.get("attributes", []), suffix)}
                for e in s.get("events", [])
            ],
            "dropped_events": s.get("dropped_events_count"),
            "links": [
                {
                    "to": label(link.get("span_id")),
                    "attributes": _attrs(link.get("attributes", []), suffix),
                    "flags": link.get("flags"),
                }
                for link in s.get("links", [])
            ],
            "dropped_links": s.get("dropped_links_count"),
            "status": s.get("status", {}),
            "resource": found["resource"],
            "scope": found["scope"],
        }
        out.append(json.dumps(line, sort_keys=True))
    return sorted(out)


async def _run(
    accel: str,
    admin: Admin,
    receiver: GrpcReceiver,
    db_url: str,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> tuple[list[str], str]:
    """One run of the scenario in its own process; (its spans normalised, its log)."""
    suffix = unique("")
    spec_path = isolated_spec(tmp_path, suffix)
    spec = load_spec(spec_path)
    await create_topics(kafka_bootstrap, spec.topics, partitions=spec.partitions)
    conn = await asyncpg.connect(db_url)
    try:  # the same event ids in both runs: a fresh ledger and fresh effect tables
        await conn.execute(
            "DROP TABLE IF EXISTS processed_events, student_course_purchases, trainer_allocations,"
            " tutoring_sessions"
        )
    finally:
        await conn.close()
    await create_tables(db_url)
    admin.calls.clear()
    with receiver.received.lock:
        receiver.received.requests.clear()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOPTRACE_ACCEL": accel,
        "HOPTRACE_PIPELINE": str(spec_path),
        "HOPTRACE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HOPTRACE_DATABASE_URL": db_url,
        "TEST_OTLP_ENDPOINT": receiver.endpoint,
        "TEST_HTTP_URL": admin.url,
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import logging, asyncio;"
            "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s');"
            "from tests.instrumentation.accel_scenario import main; asyncio.run(main())",
            cwd=PROJECT_ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 180)
        log = out.decode(errors="replace")
        assert proc.returncode == 0, log[-4000:]
    finally:
        await delete_topics(kafka_bootstrap, spec.topics)
    with receiver.received.lock:
        requests = list(receiver.received.requests)
    return normalise(requests, suffix), log


async def test_speedups_change_no_span(db_url, kafka_bootstrap, admin, tmp_path) -> None:
    untested = {s: why_off(s) for s in Speedup if why_off(s) not in (None, "HOPTRACE_ACCEL=0")}
    if untested:
        pytest.skip(f"speed-ups off for an untested library version here: {untested}")
    with GrpcReceiver() as receiver:
        fast, fast_log = await _run("1", admin, receiver, db_url, kafka_bootstrap, tmp_path)
        plain, plain_log = await _run("0", admin, receiver, db_url, kafka_bootstrap, tmp_path)
    assert "is off" not in fast_log, fast_log[-4000:]
    for speedup in Speedup:  # one line each, saying why
        assert plain_log.count(f"speed-up {speedup} is off (HOPTRACE_ACCEL=0)") == 1, plain_log
    # the scenario happened: both payments, both hops, the retry, the dead letter, the HTTP
    # calls (503, 200, 400), the handlers' rows, the send spans
    names = Counter(json.loads(line)["name"] for line in fast)
    assert names["payment.confirmed"] == 2 and names["purchase.created"] == 2
    assert names["trainer.allocated"] == 2
    assert sum(n for name, n in names.items() if name.endswith(".dlq send")) == 1
    assert names["POST"] == 3 and names["INSERT"] == 3
    allocated = [json.loads(x) for x in fast if json.loads(x)["name"] == "trainer.allocated"]
    by_cid = {a["attributes"][c.ATTR_CORRELATION_ID][0][1]: a for a in allocated}
    assert set(by_cid) == set(PAYMENTS)
    ok, bad = by_cid["diff-ok-1"], by_cid["diff-bad-1"]
    assert ok["attributes"][c.ATTR_ATTEMPTS] == [["int_value", "2"]]
    assert [e["name"] for e in ok["events"]] == [c.EXCEPTION_EVENT]
    assert (
        bad["status"].get("code") == "STATUS_CODE_ERROR" and c.ATTR_DLQ_TOPIC in bad["attributes"]
    )
    # and the spans are the same, field by field
    assert len(plain) == len(fast)
    only_fast = sorted((Counter(fast) - Counter(plain)).elements())
    only_plain = sorted((Counter(plain) - Counter(fast)).elements())
    assert (only_fast, only_plain) == ([], []), "\n".join(
        ["with the speed-ups:", *only_fast, "without:", *only_plain]
    )
