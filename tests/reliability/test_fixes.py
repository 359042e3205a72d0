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
from hoptrace.contract import load_spec
from hoptrace.instrumentation import hop
from hoptrace.instrumentation.hop import commits
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

    monkeypatch.setattr(commits, "flush_tracing", flush)
    rt = hop.HopRuntime(
        load_spec(REFERENCE_SPEC),
        "purchase.created",
        lambda ctx: None,  # type: ignore[arg-type,return-value]
        hop.HopOptions(bootstrap="127.0.0.1:1", database_url="postgresql://x@127.0.0.1:1/x"),
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
        # collector down: the flush cannot finish, so the offset waits (a kill redelivers)
        monkeypatch.setattr(
            commits, "flush_tracing", lambda timeout_s=5.0: calls.append("x") and False
        )
        rec = ConsumerRecord("purchase-confirmed", 1, 6, 0, 0, None, b"", None, 0, 0, [])
        await rt._commit(rec)
        await rt._commit_pending()
        assert calls[-1] == "x" and rt._pending == {TopicPartition("purchase-confirmed", 1): 7}
        monkeypatch.setattr(commits, "flush_tracing", flush)
        await rt._commit_pending()
        assert calls[-2:] == ["flush", "commit [(1, 7)]"] and rt._pending == {}
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


def _runtime(db_url: str, **kw: object) -> hop.HopRuntime:
    return hop.HopRuntime(
        load_spec(REFERENCE_SPEC),
        "session.created",
        kw.pop("handler", None) or (lambda ctx: None),  # type: ignore[arg-type]
        hop.HopOptions(bootstrap="127.0.0.1:1", database_url=db_url, **kw),  # type: ignore[arg-type]
    )


async def test_connection_taken_back_by_the_pool_is_replaced(db_url) -> None:
    """Fix: after a PostgreSQL restart the pool takes the runtime's held connection back (its
    backend is gone); the runtime kept calling it ('connection has been released back to the
    pool') and dead-lettered every following record (the long chaos run lost 502 payments at
    allocation-worker). The pool taking it back is reproduced directly (deterministic)."""
    rt = _runtime(db_url)
    rt._pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        conn = await rt._connection()
        await rt._pool.release(conn)  # what the pool does when the backend goes away
        with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
            conn.is_closed()
        fresh = await rt._connection()
        assert fresh is not conn
        assert await fresh.fetchval("SELECT 1") == 1
    finally:
        await rt._drop_connection()
        await rt._pool.close()


def test_outages_are_told_apart_from_failures() -> None:
    import httpx
    from aiokafka.errors import KafkaConnectionError

    outages = [
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.InterfaceError("connection has been released back to the pool"),
        ConnectionRefusedError(111, "refused"),
        httpx.ConnectError("refused"),
        KafkaConnectionError("broker down"),
    ]
    assert all(hop.is_outage(e) for e in outages)
    request = httpx.Request("POST", "http://admin/allocate")
    failures = [
        httpx.HTTPStatusError("500", request=request, response=httpx.Response(500)),
        hop.EffectMissing("no row"),
        asyncpg.UniqueViolationError("dup"),
    ]
    assert not any(hop.is_outage(e) for e in failures)


async def test_an_outage_longer_than_the_retries_does_not_dead_letter(db_url) -> None:
    """Fix: retryable errors were dead-lettered after max_attempts (~3 s with the defaults), so
    a database restart, a broker restart or a restarting admin-service longer than that parked
    healthy records in the DLQ: lost payments. An outage is now retried until it ends."""
    from aiokafka.structs import ConsumerRecord
    from opentelemetry.trace import INVALID_SPAN

    from hoptrace.instrumentation.envelope import Envelope

    conn = await asyncpg.connect(db_url)
    try:
        await hop.ensure_processed_events(conn)
        await conn.execute(
            "CREATE TABLE tutoring_sessions (correlation_id text PRIMARY KEY, trainer text)"
        )
    finally:
        await conn.close()
    failures = 0

    async def handler(ctx: hop.HopContext) -> None:
        nonlocal failures
        if failures < 8:  # the dependency is down for 8 attempts; max_attempts is 3
            failures += 1
            raise ConnectionRefusedError(111, "Connection refused")
        await ctx.conn.execute("INSERT INTO tutoring_sessions VALUES ($1, 't')", ctx.correlation_id)

    rt = _runtime(db_url, handler=handler, max_attempts=3, backoff_s=0.01, max_backoff_s=0.02)
    rt._pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    env = Envelope.new("TRAINER_ALLOCATED", 1, "outage-1", {"payment_id": "outage-1"})
    rec = ConsumerRecord("trainer-allocated", 0, 7, 0, 0, None, env.to_bytes(), None, 0, 0, [])
    info = hop.RecordInfo("trainer-allocated", 0, 7, "session-worker")
    try:
        outcome = await asyncio.wait_for(
            rt._attempts(rec, info, [], INVALID_SPAN, env, "outage-1"), 20
        )
    finally:
        await rt._drop_connection()
        await rt._pool.close()
    assert outcome == "ok" and failures == 8
    assert rt.stats["dead_lettered"] == 0 and rt.stats["retries"] == 8


def test_a_stalled_correlation_that_fails_further_on_resolves_its_alert() -> None:
    """Fix: the stall alert was resolved only when the correlation went on to in_progress or
    completed; stalled -> failed (a later step errored) -> completed never resolved it (the
    chaos run ended with alerts firing for completed payments)."""
    from hoptrace.collector.state import StepObs, fold

    spec = load_spec(REFERENCE_SPEC)
    t0 = 1_767_225_600_000_000  # 2026-01-01 in microseconds

    def ob(i: int, outcome: str = "ok") -> StepObs:
        at = t0 + i * 1_000_000
        return StepObs("c", spec.steps[i].id, at, at + 1000, outcome, "boom" * (outcome == "error"))

    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    row = fold(spec, None, [ob(0)], now)
    row["state"] = "stalled"  # the scan fired its alert
    failed = fold(spec, row, [ob(1), ob(2, "error")], now)
    assert failed["state"] == "failed" and failed["resolved"]
    done = fold(spec, failed, [ob(2), ob(3)], now)
    assert done["state"] == "completed" and not done["resolved"]  # nothing left to resolve


def test_a_wrapped_connection_error_is_an_outage() -> None:
    """Fix: allocation-worker wraps admin-service's ConnectError in RetryableError; the runtime
    did not see an outage and dead-lettered records while admin-service restarted."""
    import httpx

    from hoptrace.instrumentation.envelope import RetryableError

    try:
        try:
            raise httpx.ConnectError("All connection attempts failed")
        except httpx.ConnectError as inner:
            raise RetryableError("admin-service unreachable") from inner
    except RetryableError as exc:
        assert hop.is_outage(exc)
    assert not hop.is_outage(RetryableError("admin-service answered 500"))


async def _value(v: object) -> object:
    return v


async def test_any_failure_reading_a_record_makes_it_poison(db_url, monkeypatch) -> None:
    """Fix: only PoisonRecord was dead-lettered; any other exception while parsing (e.g.
    RecursionError from a deeply nested value) failed the lane, ended the worker and, after a
    restart, blocked the partition on the same record. Now any such failure is poison."""
    from aiokafka.structs import ConsumerRecord
    from opentelemetry.trace import INVALID_SPAN

    from hoptrace.instrumentation import envelope

    def explode(_data: object) -> envelope.Envelope:
        raise MemoryError("the decoder gave up")

    monkeypatch.setattr(envelope.Envelope, "parse", explode)
    rt = _runtime(db_url)
    parked: list[str] = []

    async def write(record, headers, span, reason, exc, attempts) -> None:  # noqa: ANN001
        parked.append(reason)

    rt.dead_letters.write = write  # type: ignore[method-assign]
    rec = ConsumerRecord("trainer-allocated", 0, 3, 0, 0, None, b"{}", None, 0, 0, [])
    info = hop.RecordInfo("trainer-allocated", 0, 3, "session-worker")
    outcome = await rt._process_in_span(rec, info, [], INVALID_SPAN, "cid-1")
    assert outcome == "error"
    assert parked and "MemoryError" in parked[0] and "the decoder gave up" in parked[0]


def test_resource_shortage_and_shutdowns_are_outages_handler_interface_errors_are_bugs() -> None:
    """Fix: SQLSTATE class 53 (too many connections, disk full, out of memory) and 57P04/57P05
    were retried a few times and then dead-lettered (~3 s): a resource shortage parked healthy
    records. They are outages now (retried until they end). An asyncpg InterfaceError a handler
    causes (a wrong argument type, a misused connection) was an outage, retried forever: it is
    a bug, dead-lettered at once; one that says the connection went away is still an outage."""
    outages = [
        asyncpg.InsufficientResourcesError("53000"),
        asyncpg.DiskFullError("could not extend file: No space left on device"),
        asyncpg.OutOfMemoryError("out of memory"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.ConfigurationLimitExceededError("temporary file size exceeds temp_file_limit"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CrashShutdownError("57P02"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.DatabaseDroppedError("57P04"),
        asyncpg.IdleSessionTimeoutError("57P05"),
        asyncpg.ConnectionFailureError("08006"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InterfaceError(
            "cannot call Connection.fetch(): connection has been released back to the pool"
        ),
    ]
    for exc in outages:
        assert hop.is_outage(exc) and hop.is_retryable(exc), exc
    bugs = [
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.InterfaceError(
            "cannot use Connection.transaction() in a manually started transaction"
        ),
    ]
    for exc in bugs:
        assert not hop.is_outage(exc) and not hop.is_retryable(exc), exc
    # still retryable, still not outages: a few attempts, then the dead-letter topic
    for exc in (asyncpg.QueryCanceledError("57014"), asyncpg.SerializationError("40001")):
        assert hop.is_retryable(exc) and not hop.is_outage(exc), exc


@pytest.fixture
def limited_role(db_url: str) -> Iterator[str]:
    """A login role limited to ONE connection, with the rights a worker needs in the per-test
    database (connection limits apply to every role but superusers); yields its URL."""
    import uuid

    role = f"lim_{uuid.uuid4().hex[:8]}"

    async def setup() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await hop.ensure_processed_events(conn)
            await conn.execute(
                "CREATE TABLE tutoring_sessions (correlation_id text PRIMARY KEY, trainer text)"
            )
            await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'lim' CONNECTION LIMIT 1")
            await conn.execute(f"GRANT {role} TO CURRENT_USER")  # to drop what it owns later
            await conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
        finally:
            await conn.close()

    asyncio.run(setup())
    base, _, rest = db_url.partition("://")
    yield f"{base}://{role}:lim@{rest.split('@', 1)[1]}"
    asyncio.run(teardown())


def _record(cid: str):  # noqa: ANN202
    from aiokafka.structs import ConsumerRecord

    from hoptrace.instrumentation.envelope import Envelope

    env = Envelope.new("TRAINER_ALLOCATED", 1, cid, {"payment_id": cid})
    rec = ConsumerRecord("trainer-allocated", 0, 7, 0, 0, None, env.to_bytes(), None, 0, 0, [])
    return rec, hop.RecordInfo("trainer-allocated", 0, 7, "session-worker"), env


async def test_too_many_connections_is_retried_until_it_ends_never_dead_lettered(
    limited_role: str,
) -> None:
    """Real PostgreSQL answers 53300 (too many connections for the role) while another client
    holds the role's only connection: the record is retried past max_attempts, and handled
    once the connection is free again. Before: dead-lettered after 3 attempts."""
    from opentelemetry.trace import INVALID_SPAN

    async def handler(ctx: hop.HopContext) -> None:
        await ctx.conn.execute("INSERT INTO tutoring_sessions VALUES ($1, 't')", ctx.correlation_id)

    rt = _runtime(limited_role, handler=handler, max_attempts=3, backoff_s=0.01, max_backoff_s=0.05)
    parked: list[str] = []

    async def write(record, headers, span, reason, exc, attempts) -> None:  # noqa: ANN001
        parked.append(reason)

    rt.dead_letters.write = write  # type: ignore[method-assign]
    blocker = await asyncpg.connect(limited_role)  # the role's one connection
    rt._pool = await asyncpg.create_pool(limited_role, min_size=0, max_size=2)
    rec, info, env = _record("shortage-1")

    async def free_it_later() -> None:
        await wait_for(lambda: _value(rt.stats["retries"] >= 6 or bool(parked)), timeout=20)
        await blocker.close()

    freer = asyncio.create_task(free_it_later())
    try:
        outcome = await asyncio.wait_for(
            rt._attempts(rec, info, [], INVALID_SPAN, env, "shortage-1"), 30
        )
    finally:
        await freer
        await rt._drop_connection()
        await rt._pool.close()
    assert parked == [] and outcome == "ok", parked
    assert rt.stats["retries"] >= 6  # past max_attempts = 3
    conn = await asyncpg.connect(limited_role)
    try:
        assert await conn.fetchval("SELECT count(*) FROM tutoring_sessions") == 1
    finally:
        await conn.close()


async def test_an_interface_error_from_the_handler_is_dead_lettered_not_retried_forever(
    db_url: str,
) -> None:
    """A handler running two statements at once on its connection: asyncpg raises
    InterfaceError ("another operation is in progress") on a healthy connection. Before: an
    "outage", retried forever (the lane and its partition's commits stuck). Now: a bug,
    dead-lettered at once with the reason."""
    from opentelemetry.trace import INVALID_SPAN

    conn = await asyncpg.connect(db_url)
    try:
        await hop.ensure_processed_events(conn)
        await conn.execute(
            "CREATE TABLE tutoring_sessions (correlation_id text PRIMARY KEY, trainer text)"
        )
    finally:
        await conn.close()
    calls = 0

    async def handler(ctx: hop.HopContext) -> None:
        nonlocal calls
        calls += 1
        await asyncio.gather(
            ctx.conn.execute("INSERT INTO tutoring_sessions VALUES ($1, 't')", ctx.correlation_id),
            ctx.conn.fetchval("SELECT pg_sleep(0.05)"),
        )

    rt = _runtime(db_url, handler=handler, max_attempts=3, backoff_s=0.01, max_backoff_s=0.02)
    parked: list[str] = []

    async def write(record, headers, span, reason, exc, attempts) -> None:  # noqa: ANN001
        parked.append(reason)

    rt.dead_letters.write = write  # type: ignore[method-assign]
    rt._pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    rec, info, env = _record("bug-1")
    try:
        outcome = await asyncio.wait_for(
            rt._attempts(rec, info, [], INVALID_SPAN, env, "bug-1"), 10
        )
    finally:
        await rt._drop_connection()
        await rt._pool.close()
    assert outcome == "error" and calls == 1
    assert len(parked) == 1 and "InterfaceError" in parked[0], parked
    assert "another operation is in progress" in parked[0]
