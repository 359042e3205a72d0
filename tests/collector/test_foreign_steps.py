"""Steps of services hoptrace did not write, at ingest: their consumer spans (every semconv
spelling) become step runs of the correlation state, a failure below a run fails it, a run
without a correlation id gets its trace's (parked until the trace names one), and the state
follows a fan-out pipeline's DAG."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from hoptrace.collector import schema
from hoptrace.collector.decode import DecodeKeys, decode_body
from hoptrace.collector.state import StepObs, fold, foreign_runs
from hoptrace.collector.writer import Writer, init_connection
from hoptrace.contract import parse_spec
from hoptrace.contract.conventions import GROUP_KEYS, MESSAGE_KEY_KEYS, OFFSET_KEYS, PARTITION_KEYS
from hoptrace.contract.matching import Messaging, StepMatcher

from .helpers import kv

NOW = datetime.now(UTC).replace(microsecond=0)
NOW_NS = int(NOW.timestamp()) * 10**9

#: A payment pipeline run by services hoptrace did not write, with a fan-out: payment confirmed
#: -> purchase (Node) -> session (Java); payment confirmed -> receipt mailer.
FOREIGN = parse_spec(
    {
        "pipeline": {
            "name": "shop",
            "correlation": {"attribute": "app.payment_id", "message_key": True},
        },
        "steps": [
            {"id": "paid", "service": "pay-api", "emits": "paid", "deadline": "5s"},
            {
                "id": "purchase",
                "service": "purchases-node",
                "consumes": "paid",
                "group": "purchases",
                "emits": "purchased",
                "deadline": "30s",
            },
            {
                "id": "session",
                "service": "sessions-java",
                "consumes": "purchased",
                "group": "sessions",
                "deadline": "30s",
            },
            {
                "id": "receipt",
                "service": "mailer",
                "consumes": "paid",
                "group": "mailer",
                "after": ["paid"],
                "deadline": "10s",
            },
        ],
    }
)
MATCHER = StepMatcher(FOREIGN)


def sp(
    name: str,
    kind: int,
    attrs: list[Any],
    *,
    trace: bytes,
    parent: bytes = b"",
    at_s: float = 0.0,
    error: str | None = None,
    span_id: bytes | None = None,
) -> Span:
    start = NOW_NS + int(at_s * 1e9)
    return Span(
        trace_id=trace,
        span_id=span_id or os.urandom(8),
        parent_span_id=parent,
        name=name,
        kind=kind,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 5_000_000,
        attributes=attrs,
        status=Status(code=2, message=error) if error else Status(),
    )


def req(*spans: tuple[str, Span]) -> ExportTraceServiceRequest:
    out = ExportTraceServiceRequest()
    for service, span in spans:
        rs = out.resource_spans.add()
        rs.resource.attributes.append(kv("service.name", service))
        rs.scope_spans.add().spans.append(span)
    return out


KEYS = DecodeKeys.for_spec(FOREIGN)


def candidates(r: ExportTraceServiceRequest) -> list[Any]:
    out = decode_body(r.SerializeToString(), NOW, keys=KEYS)
    return out.candidates


def producer(trace: bytes, cid: str) -> tuple[str, Span]:
    """pay-api's send span: a producer-only first step, the payment id as the message key."""
    return "pay-api", sp(
        "paid send",
        Span.SPAN_KIND_PRODUCER,
        [kv("messaging.destination.name", "paid"), kv("messaging.kafka.message.key", cid)],
        trace=trace,
        span_id=b"\x01" * 8,
    )


def node_consumer(trace: bytes, cid: str, *, error: str | None = None) -> tuple[str, Span]:
    """kafkajs: `process <topic>`, no group attribute, the id in a named attribute."""
    return "purchases-node", sp(
        "process paid",
        Span.SPAN_KIND_CONSUMER,
        [
            kv("messaging.destination.name", "paid"),
            kv("messaging.operation.type", "process"),
            kv("messaging.kafka.offset", "0"),
            kv("app.payment_id", cid),
        ],
        trace=trace,
        parent=b"\x01" * 8,
        at_s=0.1,
        error=error,
        span_id=b"\x02" * 8,
    )


def java_consumer(trace: bytes) -> tuple[str, Span]:
    """The Java agent's default spelling; no correlation id at all (no baggage copy)."""
    return "sessions-java", sp(
        "purchased process",
        Span.SPAN_KIND_CONSUMER,
        [
            kv("messaging.destination", "purchased"),
            kv("messaging.operation", "process"),
            kv("messaging.kafka.consumer.group", "sessions"),
            kv("messaging.kafka.message.offset", 3),
        ],
        trace=trace,
        parent=b"\x02" * 8,
        at_s=0.2,
        span_id=b"\x03" * 8,
    )


def jdbc_failure(trace: bytes) -> tuple[str, Span]:
    return "sessions-java", sp(
        "INSERT shop.tutoring_sessions",
        Span.SPAN_KIND_CLIENT,
        [kv("db.sql.table", "tutoring_sessions")],
        trace=trace,
        parent=b"\x03" * 8,
        at_s=0.201,
        error="ERROR: column does not exist",
    )


# ------------------------------------------------------------------ pure rules


def test_consumer_spans_in_every_spelling_are_step_runs() -> None:
    trace = os.urandom(16)
    runs = foreign_runs(
        candidates(req(producer(trace, "p1"), node_consumer(trace, "p1"), java_consumer(trace))),
        MATCHER,
    )
    assert [(r.step, r.correlation_id, r.failed) for r in runs] == [
        ("paid", "p1", False),
        ("purchase", "p1", False),
        ("session", None, False),  # its trace names the correlation (the writer looks)
    ]


#: One service consuming one topic as two steps under two groups: only the group tells them apart.
GROUPED = parse_spec(
    {
        "pipeline": {"name": "books", "correlation": {"message_key": True}},
        "steps": [
            {"id": "paid", "service": "pay-api", "emits": "paid", "deadline": "5s"},
            {
                "id": "ledger",
                "service": "books",
                "consumes": "paid",
                "group": "ledger",
                "deadline": "10s",
            },
            {
                "id": "audit",
                "service": "books",
                "consumes": "paid",
                "group": "audit",
                "after": ["paid"],
                "deadline": "10s",
            },
        ],
    }
)


@pytest.mark.parametrize("key_attr", MESSAGE_KEY_KEYS)
@pytest.mark.parametrize("group_attr", GROUP_KEYS)
def test_every_group_and_message_key_spelling_is_read_at_ingest(
    group_attr: str, key_attr: str
) -> None:
    trace = os.urandom(16)
    spans = [
        (
            "books",
            sp(
                "paid process",
                Span.SPAN_KIND_CONSUMER,
                [
                    kv("messaging.destination.name", "paid"),
                    kv("messaging.operation.type", "process"),
                    kv(group_attr, group),
                    kv(key_attr, "p7"),
                ],
                trace=trace,
            ),
        )
        for group in ("audit", "ledger")
    ]
    out = decode_body(req(*spans).SerializeToString(), NOW, keys=DecodeKeys.for_spec(GROUPED))
    runs = foreign_runs(out.candidates, StepMatcher(GROUPED))
    assert sorted((r.step, r.correlation_id) for r in runs) == [("audit", "p7"), ("ledger", "p7")]


@pytest.mark.parametrize("offset_attr", OFFSET_KEYS)
@pytest.mark.parametrize("partition_attr", PARTITION_KEYS)
def test_partition_and_offset_in_every_spelling(partition_attr: str, offset_attr: str) -> None:
    m = Messaging.of({partition_attr: 2, offset_attr: "41", "messaging.kafka.message_key": "k"})
    assert (m.partition, m.offset, m.key) == (2, 41, "k")


def test_a_failed_span_below_fails_the_run_and_a_receive_span_is_no_run() -> None:
    trace = os.urandom(16)
    receive = (
        "purchases-node",
        sp(
            "paid receive",
            Span.SPAN_KIND_CONSUMER,
            [kv("messaging.destination.name", "paid"), kv("messaging.operation.type", "receive")],
            trace=trace,
        ),
    )
    stranger = ("someone-else", node_consumer(trace, "p1")[1])
    runs = foreign_runs(
        candidates(req(java_consumer(trace), jdbc_failure(trace), receive, stranger)), MATCHER
    )
    assert len(runs) == 1
    (run,) = runs
    assert run.step == "session" and run.failed
    assert run.error == "INSERT shop.tutoring_sessions: ERROR: column does not exist"


def test_a_service_instrumented_by_hoptrace_counts_only_through_its_step_spans() -> None:
    trace = os.urandom(16)
    r = req(producer(trace, "p1"))
    r.resource_spans[0].resource.attributes.append(kv("telemetry.distro.name", "hoptrace"))
    assert foreign_runs(candidates(r), MATCHER) == []


def _obs(step: str, at: float, outcome: str = "ok") -> StepObs:
    start = int(NOW.timestamp() * 1e6) + int(at * 1e6)
    return StepObs("p1", step, start, start + 1000, outcome, "boom" if outcome == "error" else None)


def test_fan_out_state_follows_the_dag() -> None:
    row = fold(FOREIGN, None, [_obs("paid", 0), _obs("purchase", 1)], NOW)
    # two branches wait: the receipt (due 10 s after paid) and the session (30 s after purchase)
    assert row["state"] == "in_progress" and row["next_step"] == "receipt"
    assert row["next_deadline"] == NOW + timedelta(seconds=10.001)
    row = fold(FOREIGN, row, [_obs("receipt", 2)], NOW)
    assert row["state"] == "in_progress" and row["next_step"] == "session"
    assert row["next_deadline"] == NOW + timedelta(seconds=31.001)
    done = fold(FOREIGN, row, [_obs("session", 3)], NOW)
    assert done["state"] == "completed"
    assert done["completed_at"] == NOW + timedelta(seconds=3.001)
    failed = fold(FOREIGN, row, [_obs("session", 3, "error")], NOW)
    assert failed["state"] == "failed" and failed["failed_step"] == "session"
    # a leaf done is not completion while the other branch is open
    one_leaf = fold(FOREIGN, None, [_obs("paid", 0), _obs("receipt", 1)], NOW)
    assert one_leaf["state"] == "in_progress" and one_leaf["next_step"] == "purchase"


# ------------------------------------------------------------------ the store


async def _writer(db_url: str, spec_path: Path) -> tuple[asyncpg.Connection, asyncpg.Pool, Writer]:
    del spec_path  # the foreign pipeline's spec is given here
    conn = await asyncpg.connect(db_url)
    await schema.migrate(conn, timedelta(days=7), spec=FOREIGN)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2, init=init_connection)
    return conn, pool, Writer(pool, FOREIGN, timedelta(days=7))


async def _write(writer: Writer, r: ExportTraceServiceRequest) -> None:
    out = decode_body(r.SerializeToString(), NOW, keys=KEYS)
    await writer.write_spans([out.encoded if out.encoded is not None else out.rows])


async def _steps(conn: asyncpg.Connection, cid: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT state, steps::text AS steps FROM correlations WHERE correlation_id = $1", cid
    )
    return {} if row is None else {"state": row["state"], **json.loads(row["steps"])}


async def test_runs_get_their_trace_s_correlation_parked_until_it_arrives(
    db_url: str, spec_path: Path
) -> None:
    conn, pool, writer = await _writer(db_url, spec_path)
    try:
        trace = os.urandom(16)
        # the Java consumer's span comes first: nothing in its trace names a correlation yet
        await _write(writer, req(java_consumer(trace)))
        assert await conn.fetchval("SELECT count(*) FROM pending_steps") == 1
        assert await conn.fetchval("SELECT count(*) FROM correlations") == 0
        # the upstream spans name it: the parked run is folded with them
        await _write(writer, req(producer(trace, "p7"), node_consumer(trace, "p7")))
        assert await conn.fetchval("SELECT count(*) FROM pending_steps") == 0
        steps = await _steps(conn, "p7")
        assert {k for k, v in steps.items() if k != "state" and v["done_at"]} == {
            "paid",
            "purchase",
            "session",
        }
        # in the same batch as the span that names its trace: no parking
        trace2 = os.urandom(16)
        await _write(writer, req(producer(trace2, "p8"), java_consumer(trace2)))
        assert await conn.fetchval("SELECT count(*) FROM pending_steps") == 0
        assert "session" in await _steps(conn, "p8")
    finally:
        await pool.close()
        await conn.close()


async def test_a_failure_stored_before_its_run_fails_the_run(db_url: str, spec_path: Path) -> None:
    conn, pool, writer = await _writer(db_url, spec_path)
    try:
        trace = os.urandom(16)
        await _write(writer, req(producer(trace, "p9"), node_consumer(trace, "p9")))
        await _write(writer, req(jdbc_failure(trace)))  # exported before its parent
        await _write(writer, req(java_consumer(trace)))
        steps = await _steps(conn, "p9")
        assert steps["session"]["done_at"] is None and steps["session"]["error"] == 1
        assert steps["session"]["last_error"].endswith("column does not exist")
        assert steps["state"] == "failed"
    finally:
        await pool.close()
        await conn.close()


async def test_hoptrace_s_own_runs_get_their_trace_s_correlation_too(
    db_url: str, spec_path: Path
) -> None:
    """A pipeline correlated by the message key only: hoptrace's own step spans carry no key
    (their baggage attribute is no carrier here), so they take their trace's id at ingest."""
    del spec_path
    keyed = parse_spec(
        {
            "pipeline": {
                "name": "payments",
                "correlation": {"baggage": False, "message_key": True},
            },
            "steps": [
                {"id": "paid", "service": "pay-api", "emits": "paid", "deadline": "5s"},
                {
                    "id": "purchase",
                    "service": "purchases",
                    "consumes": "paid",
                    "group": "purchases",
                    "deadline": "30s",
                },
            ],
        }
    )
    conn = await asyncpg.connect(db_url)
    await schema.migrate(conn, timedelta(days=7), spec=keyed)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2, init=init_connection)
    try:
        writer = Writer(pool, keyed, timedelta(days=7))
        trace = os.urandom(16)
        own = sp(
            "purchase",
            Span.SPAN_KIND_CONSUMER,
            [
                kv("hoptrace.step", "purchase"),
                kv("hoptrace.step.outcome", "ok"),
                kv("hoptrace.correlation_id", "p5"),  # not a carrier of this spec
            ],
            trace=trace,
            parent=b"\x01" * 8,
            at_s=0.1,
        )
        r = req(producer(trace, "p5"), ("purchases", own))
        out = decode_body(r.SerializeToString(), NOW, keys=DecodeKeys.for_spec(keyed))
        await writer.write_spans([out.encoded if out.encoded is not None else out.rows])
        steps = await _steps(conn, "p5")
        assert steps["state"] == "completed", steps
        assert steps["purchase"]["ok"] == 1
    finally:
        await pool.close()
        await conn.close()
