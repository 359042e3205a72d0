"""Regression tests for what the chaos run found (one test per fix)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from hoptrace.collector import schema
from hoptrace.collector.alerts import AlertDispatcher, Targets
from hoptrace.instrumentation import hop
from hoptrace.instrumentation.spec import load_spec
from hoptrace.instrumentation.tracing import (
    configure_tracing,
    export_stats,
    get_tracer,
    shutdown_tracing,
)

from ..support import wait_for

REFERENCE_SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "payments.toml"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Receiver:
    """OTLP/HTTP protobuf receiver on a given port (spans counted), or a webhook (JSON kept)."""

    def __init__(self, port: int = 0) -> None:
        self.spans = 0
        self.posts: list[dict] = []
        lock = threading.Lock()
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.endswith("/v1/traces"):
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                    out = ExportTraceServiceResponse().SerializeToString()
                    with lock:
                        rx.spans += n
                else:
                    with lock:
                        rx.posts.append(json.loads(body))
                    out = b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_tracing() -> Iterator[None]:
    yield
    shutdown_tracing(2.0)


async def test_failed_export_is_held_until_the_collector_returns(monkeypatch, no_tracing) -> None:
    """Fix: spans exported while the collector is down were dropped (a 30 s collector stop lost
    every payment's spans of that window and their diagnosis). Now the batch is held and retried."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    port = _closed_port()
    before = export_stats()
    configure_tracing(
        "hoptrace-tests",
        endpoint=f"http://127.0.0.1:{port}",
        protocol="http/protobuf",
        schedule_delay_millis=50,
        hold_s=30,
        instrument=False,
    )
    spec = load_spec(REFERENCE_SPEC)
    tracer = get_tracer()
    for i in range(40):
        with tracer.start_as_current_span(spec.steps[0].id) as span:
            span.set_attribute("hoptrace.correlation_id", f"held-{i}")
    # the first attempt fails (nothing listens); the batch is held, not dropped
    await wait_for(
        lambda: _value(export_stats()["ended"] >= before["ended"] + 40), what="spans ended"
    )
    rx = _Receiver(port)  # the collector comes back on the same port
    try:
        await wait_for(lambda: _value(rx.spans >= 40), timeout=20, what="held spans delivered")
        after = export_stats()
        assert after["export_failed"] == before["export_failed"]
        assert after["exported"] >= before["exported"] + 40
    finally:
        rx.close()


async def test_export_stats_are_written_per_process(tmp_path, monkeypatch, no_tracing) -> None:
    """Added for the chaos run: HOPTRACE_EXPORT_STATS_DIR receives each process's counts after
    every export (a SIGKILLed process leaves its last counts)."""
    monkeypatch.setenv("HOPTRACE_EXPORT_STATS_DIR", str(tmp_path))
    rx = _Receiver()
    try:
        configure_tracing(
            "hoptrace-tests",
            endpoint=f"http://127.0.0.1:{rx.port}",
            protocol="http/protobuf",
            schedule_delay_millis=50,
            instrument=False,
        )
        with get_tracer().start_as_current_span("counted"):
            pass
        files = await wait_for(
            lambda: _value(list(tmp_path.glob("*.json"))), what="an export stats file"
        )
        doc = json.loads(files[0].read_text())
        assert doc["exported"] >= 1 and "ended" in doc and doc["service"]
    finally:
        rx.close()


async def test_alert_resolved_before_its_firing_went_out_sends_both(db_url) -> None:
    """Fix: a stall that resolved before its firing was delivered reached the webhook only as
    'resolved' (receivers counting firing/resolved saw a resolve for an alert that never fired)."""
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=1))
        await conn.execute(
            "INSERT INTO alerts (correlation_id, pipeline, step, status, resolved_at) "
            "VALUES ('quick-1', 'payments', 'purchase.created', 'resolved', now())"
        )
    finally:
        await conn.close()
    rx = _Receiver()
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    d = AlertDispatcher(
        pool,
        Targets(None, f"http://127.0.0.1:{rx.port}/hook", "http://dash", "http://jaeger"),
        lambda: True,
    )
    try:
        assert await d.deliver_due() == 1
        statuses = [p["status"] for p in rx.posts]
        assert statuses == ["firing", "resolved"]
        assert all(p["alerts"][0]["labels"]["correlation_id"] == "quick-1" for p in rx.posts)
        row = await pool.fetchrow("SELECT delivered_firing, delivered_resolved FROM alerts")
        assert row["delivered_firing"] and row["delivered_resolved"]
        assert await d.deliver_due() == 0  # nothing sent twice
        assert len(rx.posts) == 2
    finally:
        await d.aclose()
        await pool.close()
        rx.close()


async def test_offsets_are_committed_only_after_the_spans_are_exported(monkeypatch) -> None:
    """Fix: the offset was committed right after the step span ended, while the span still sat
    in the SDK's queue; a SIGKILL then lost the span for good (diagnosis: consumed_without_trace
    for a completed payment). Now offsets are committed by a loop after a flush."""
    from aiokafka import TopicPartition
    from aiokafka.structs import ConsumerRecord

    calls: list[str] = []

    class Consumer:
        async def commit(self, offsets: dict) -> None:
            calls.append(f"commit {sorted((tp.partition, o) for tp, o in offsets.items())}")

    def flush(timeout_s: float = 5.0) -> bool:
        calls.append("flush")
        return True

    monkeypatch.setattr(hop, "flush_tracing", flush)
    rt = hop.HopRuntime(
        load_spec(REFERENCE_SPEC),
        "purchase.created",
        lambda ctx: None,  # type: ignore[arg-type,return-value]
        bootstrap="127.0.0.1:1",
        database_url="postgresql://x@127.0.0.1:1/x",
    )
    rt._consumer = Consumer()  # type: ignore[assignment]
    rt._committer = asyncio.create_task(asyncio.sleep(60))  # the commit loop is running
    try:
        for offset in (4, 5):
            rec = ConsumerRecord("purchase-confirmed", 1, offset, 0, 0, None, b"", None, 0, 0, [])
            await rt._commit(rec)
        assert calls == []  # nothing committed while the spans may still be queued
        assert rt._pending == {TopicPartition("purchase-confirmed", 1): 6}
        await rt._commit_pending()
        assert calls == ["flush", "commit [(1, 6)]"]
    finally:
        rt._committer.cancel()


def test_client_error_of_a_terminated_backend_is_retryable() -> None:
    """Fix (found by the timing change above): asyncpg raises InternalClientError when a query
    runs while it is still consuming a terminated backend's error; it was dead-lettered as
    non-retryable instead of retried on a new connection."""
    exc = asyncpg.InternalClientError(
        "cannot switch to state 11; another operation (2) is in progress"
    )
    assert hop.is_retryable(exc)


async def _value(v: object) -> object:
    return v
