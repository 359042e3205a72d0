"""Steps run by services hoptrace did not write: real spans of a Node.js (kafkajs) worker and of a
Java consumer under the OpenTelemetry agent (default and stable spellings), in a pipeline whose
other steps are hoptrace's (``interop.py``). Their consumer spans are the steps' runs (the
contract's matching rules), whatever spelling their SDK uses."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import jsonschema
import pytest

from hoptrace.collector import schema, store
from hoptrace.collector.diagnosis import Evidence, KafkaFacts, RecordRef, SpanRecord, diagnose
from hoptrace.collector.kafka_facts import KafkaBase, kafka_facts
from hoptrace.collector.render import render, to_dict
from hoptrace.contract.conventions import SpanKind
from hoptrace.settings import PROJECT_ROOT

from .interop import MIXED, capture, foreign, own_send, own_step, upstream_span_id

SPEC = MIXED
CID = "6b0c3a52-3f0e-4a51-9f36-2d9f7c1e5a10"
TRACE = "5" * 32
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
SOON = T0 + timedelta(seconds=6)
LATE = T0 + timedelta(minutes=10)
SCHEMA = json.loads((PROJECT_ROOT / "docs" / "trace-json-schema.json").read_text())

NODE = {"in": "purchase-confirmed", "out": "purchase-created"}
JAVA = {"in": "trainer-allocated"}


def payment(node: str = "node-baggage") -> list[SpanRecord]:
    """payment.confirmed (hoptrace): its step span and the send span the Node consumer's span is
    a child of."""
    step = own_step(SPEC, "payment.confirmed", cid=CID, trace=TRACE, at=T0, span_id="a" * 16)
    send = own_send(
        SPEC,
        "payment.confirmed",
        cid=CID,
        trace=TRACE,
        at=T0,
        span_id=upstream_span_id(node),
        parent=step.span_id,
    )
    return [step, send]


def node(name: str = "node-baggage") -> list[SpanRecord]:
    return foreign(
        name, topics=NODE, group=None, cid=CID, trace=TRACE, t0=T0 + timedelta(seconds=1)
    )


def allocation(java: str = "java-default", outcome: str = "ok") -> list[SpanRecord]:
    """trainer.allocated (hoptrace) and the send span the Java consumer's span is a child of."""
    at = T0 + timedelta(seconds=2)
    step = own_step(
        SPEC,
        "trainer.allocated",
        cid=CID,
        trace=TRACE,
        at=at,
        span_id="b" * 16,
        outcome=outcome,
        partition=1,
        offset=7,
    )
    send = own_send(
        SPEC,
        "trainer.allocated",
        cid=CID,
        trace=TRACE,
        at=at,
        span_id=upstream_span_id(java),
        parent=step.span_id,
    )
    return [step, send]


def java(name: str = "java-default") -> list[SpanRecord]:
    return foreign(
        name,
        topics=JAVA,
        group="session-worker",
        cid=CID,
        trace=TRACE,
        t0=T0 + timedelta(seconds=3),
    )


def kafka(**overrides: dict) -> dict[str, KafkaFacts]:
    """Every consumed topic exists, every group has a member and committed past the record."""
    out = {}
    for step in SPEC.steps:
        if step.consumes:
            kf = KafkaFacts(
                topic=step.consumes,
                group=step.group,
                topic_exists=True,
                group_exists=True,
                group_state="Stable",
                group_members=1,
                committed_offset=9,
                end_offset=9,
                other_groups=(),
            )
            out[step.id] = replace(kf, **overrides.get(step.id, {}))
    return out


def evidence(spans: list[SpanRecord], **kw: object) -> Evidence:
    return Evidence(CID, spans=tuple(spans), kafka=kw.pop("kafka", None) or kafka(), **kw)


def consumer(spans: list[SpanRecord]) -> SpanRecord:
    [span] = [s for s in spans if s.kind == SpanKind.CONSUMER]
    return span


# ------------------------------------------------------------------------------ healthy
@pytest.mark.parametrize("node_capture", ["node-baggage", "node-attribute", "node-key"])
@pytest.mark.parametrize("java_capture", ["java-default", "java-stable"])
def test_healthy_foreign_steps_are_done_with_their_service_and_timing(
    node_capture: str, java_capture: str
) -> None:
    n, j = node(node_capture), java(java_capture)
    spans = payment(node_capture) + n + allocation(java_capture) + j
    d = diagnose(SPEC, evidence(spans), LATE)
    assert (d.cause, d.stopped_at, d.stopped_at_all) == ("completed", None, ()), d.evidence
    assert [s.status for s in d.steps] == ["done"] * 4
    for step_id, runs in (("purchase.created", n), ("session.created", j)):
        run = consumer(runs)
        s = d.step(step_id)
        assert s.service == SPEC.step(step_id).service == run.service
        assert (s.runs, s.outcomes) == (1, ("ok",))
        assert (s.started_at, s.ended_at) == (run.start_time, run.end_time)
        assert s.trace_ids == (TRACE,)
        assert any(f"from {run.service} ok" in line for line in s.evidence), s.evidence
    # the records, read from each SDK's own attribute names
    partition = int(capture(node_capture)["upstream"]["record"].split("[")[1].split("]")[0])
    assert d.step("purchase.created").consumed == RecordRef("purchase-confirmed", partition, 0)
    assert d.step("purchase.created").emitted == RecordRef("purchase-created", None, None)
    assert d.step("session.created").consumed.topic == "trainer-allocated"
    assert d.step("session.created").consumed.offset == 0
    assert not d.warnings, d.warnings  # the Java group is the spec's: nothing to say
    # the dashboard's timeline lanes the consumer spans by their steps
    assert d.span_steps[(TRACE, consumer(n).span_id)] == "purchase.created"
    assert d.span_steps[(TRACE, consumer(j).span_id)] == "session.created"


def test_a_foreign_consumer_run_under_another_group_is_named() -> None:
    j = foreign(
        "java-default", topics=JAVA, group=None, cid=CID, trace=TRACE, t0=T0 + timedelta(seconds=3)
    )  # the capture's own group, not the spec's
    spans = payment() + node() + allocation() + j
    d = diagnose(SPEC, evidence(spans), LATE)
    assert d.cause == "completed"
    [warning] = d.warnings
    assert "session.created was consumed as group interop-java-" in warning


def test_the_services_own_spans_other_than_its_consumer_span_are_not_runs() -> None:
    """pg, JDBC and kafkajs send spans of a foreign service, and hoptrace's own send spans, are
    no step's runs: each step ran once."""
    d = diagnose(SPEC, evidence(payment() + node() + allocation() + java()), LATE)
    assert [s.runs for s in d.steps] == [1, 1, 1, 1]
    assert len(d.span_steps) == 4


# ------------------------------------------------------------------------------ failures
def test_java_consumer_with_only_a_failed_jdbc_child_is_a_processing_error() -> None:
    """The agent leaves the consumer span UNSET and marks only the JDBC span ERROR: the run
    failed all the same, and the evidence says why (the database's error, not 'no message')."""
    j = java("java-fail-db-write")
    assert all(s.status_code != 2 for s in j if s.kind == SpanKind.CONSUMER)
    spans = payment() + node() + allocation("java-fail-db-write") + j
    d = diagnose(SPEC, evidence(spans), SOON)
    assert (d.stopped_at, d.cause, d.state) == ("session.created", "processing_error", "failed")
    assert d.stopped_at_all == ("session.created",)
    s = d.step("session.created")
    assert (s.status, s.runs, s.outcomes) == ("failed", 2, ("error", "error"))
    assert "no_such_column" in d.evidence[0] and "PSQLException" in d.evidence[0], d.evidence
    assert "failed 2 times" in " ".join(d.evidence)
    assert d.next_action.startswith("fix java-session-worker: ")
    assert "downstream" not in d.next_action  # its own database is not a downstream service


def test_node_consumer_whose_db_write_fails_is_a_processing_error() -> None:
    n = node("node-fail-db-write")
    d = diagnose(SPEC, evidence(payment("node-fail-db-write") + n), SOON)
    assert (d.stopped_at, d.cause) == ("purchase.created", "processing_error"), d.evidence
    s = d.step("purchase.created")
    assert (s.status, s.runs) == ("failed", 3)
    assert 'column "no_such_column"' in d.evidence[0]
    assert [x.status for x in d.steps] == ["done", "failed", "not_reached", "not_reached"]
    # rendered, the JSON is schema-valid and the text names the step
    doc = to_dict(d)
    jsonschema.validate(doc, SCHEMA)
    assert doc["stopped_at_all"] == ["purchase.created"]
    assert "▶ ✗ purchase.created" in render(d, "text")


# ------------------------------------------------------------------------------ stopped
def test_a_stopped_foreign_service_is_no_consumer_with_its_kafka_facts() -> None:
    """session-worker (Java) is not running: its group has no member; the record it should
    consume is the one trainer.allocated emitted, and the record trainer.allocated consumed is
    the one the Node worker's send span produced."""
    spans = payment() + node() + allocation()
    base = KafkaBase(
        partitions={t: [0, 1, 2] for t in ("purchase-confirmed", "purchase-created", "trainer-allocated")},
        groups={"purchase-worker": ("Stable", 1), "allocation-worker": ("Stable", 1), "session-worker": ("Empty", 0)},
        committed={"purchase.created": {2: 1}, "trainer.allocated": {0: 4}, "session.created": {1: 7}},
        ends={},
    )  # fmt: skip
    facts = kafka_facts(SPEC, tuple(spans), base)
    assert facts["trainer.allocated"].record == RecordRef("purchase-created", None, None)
    assert facts["session.created"].record == RecordRef("trainer-allocated", 1, 7)
    assert facts["session.created"].group_members == 0
    d = diagnose(SPEC, evidence(spans, kafka=facts), LATE)
    assert (d.stopped_at, d.cause, d.state) == ("session.created", "no_consumer", "stalled")
    assert d.next_action == "start java-session-worker"
    assert "consumer group session-worker has no members (state Empty)" in d.evidence
    assert [s.status for s in d.steps] == ["done", "done", "done", "stalled"]


def test_a_foreign_step_that_never_ran_waits_within_its_deadline() -> None:
    spans = payment()
    d = diagnose(SPEC, evidence(spans), T0 + timedelta(seconds=3))
    assert (d.stopped_at, d.cause) == ("purchase.created", "in_progress"), d.evidence
    assert d.step("purchase.created").status == "pending"


# ------------------------------------------------------------------------------ the store
async def _insert(conn: asyncpg.Connection, spans: list[SpanRecord]) -> None:
    await conn.executemany(
        "INSERT INTO spans (trace_id, span_id, parent_span_id, name, service, kind, start_time,"
        " end_time, duration_us, status_code, status_message, correlation_id, pipeline, step,"
        " outcome, attributes, events, resource, scope) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
        " $9, $10, $11, $12, $13, $14, $15, $16::jsonb, $17::jsonb, $18::jsonb, $19)",
        [
            (
                s.trace_id,
                s.span_id,
                s.parent_span_id,
                s.name,
                s.service,
                int(s.kind or 0),
                s.start_time,
                s.end_time,
                int((s.end_time - s.start_time) / timedelta(microseconds=1)),
                s.status_code,
                s.status_message,
                s.correlation_id,
                s.pipeline,
                s.step,
                s.outcome,
                json.dumps(dict(s.attributes)),
                json.dumps(list(s.events)),
                json.dumps(dict(s.resource)),
                s.scope,
            )
            for s in spans
        ],
    )


@pytest.mark.stack
async def test_spans_without_a_correlation_id_are_found_through_their_trace(db_url: str) -> None:
    """The Java agent copies no baggage by default: its JDBC spans carry no correlation id (its
    consumer spans carry the message key, a carrier of this spec). They are stored with none, and
    the lookup finds them through their trace: they are what says the run failed. Spans of other
    traces, and spans of this trace carrying another correlation's id, are not this
    correlation's."""
    j = java("java-fail-db-write")
    assert {s.correlation_id for s in j if s.kind == SpanKind.CONSUMER} == {CID}
    assert {s.correlation_id for s in j if s.kind == SpanKind.CLIENT} == {None}
    ours = payment() + node() + allocation("java-fail-db-write")
    other_trace = [replace(s, trace_id="6" * 32, correlation_id=None) for s in java()]
    orphans_elsewhere = [replace(s, trace_id="7" * 32, correlation_id=None) for s in j]
    someone_else = replace(ours[0], span_id="c" * 16, correlation_id="another-payment")
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=7))
        await _insert(conn, ours + j + other_trace + orphans_elsewhere + [someone_else])
        found = await store.spans_for_correlation(conn, CID)
        bounded = await store.spans_for_correlation(conn, CID, limit=3)
    finally:
        await conn.close()
    assert {(s.trace_id, s.span_id) for s in found} == {(s.trace_id, s.span_id) for s in ours + j}
    assert [s.start_time for s in found] == sorted(s.start_time for s in found)
    assert len(bounded) == 3
    d = diagnose(SPEC, evidence(found), SOON)
    assert (d.stopped_at, d.cause) == ("session.created", "processing_error"), d.evidence
    assert "no_such_column" in d.evidence[0]
    # without its trace's spans the consumer span alone (UNSET) would have looked fine
    carried = [s for s in found if s.correlation_id == CID]
    assert diagnose(SPEC, evidence(carried), SOON).cause == "completed"
