"""The reference pipeline with services hoptrace did not write, end to end on the real stack: the
Node.js worker (kafkajs + pg, OpenTelemetry JS) runs purchase.created, the Java consumer
(kafka-clients + JDBC, the OpenTelemetry Java agent) runs session.created; payment-service,
admin-service and allocation-worker are hoptrace's; everything exports OTLP to a real ``hoptrace
collector`` (``pipeline.py``). For each foreign step: healthy payments complete with its step done
by its service, with timing; stopped, ``no_consumer`` at its step; failing its database write,
``processing_error`` at its step. And one pipeline whose correlation id travels only as the Kafka
message key (no baggage anywhere). The dashboard's lookup draws the foreign services' spans.

One pipeline is shared by the module's tests (the ``healthy`` fixture restarts an interop service
only when a test left it stopped or faulty: a JVM start is the costliest step); the key-only
pipeline has its own. The services' logs go to ``tests/artifacts/interop-pipeline-*.log``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from hoptrace.collector import api
from hoptrace.collector.render import to_dict
from hoptrace.contract import conventions as conv
from hoptrace.contract.conventions import SpanKind
from hoptrace.dashboard.api_source import ApiSource
from hoptrace.dashboard.serve import APP
from hoptrace.settings import get_settings

from ..dashboard.apptest import show, text
from ..dashboard.seed import grant_readonly
from ..support import readonly_url, unique
from ..workers.harness import read_topic
from .pipeline import (
    JAVA_SERVICE,
    JAVA_STEP,
    NO_BAGGAGE,
    NODE_SERVICE,
    NODE_STEP,
    PYTHON_SERVICES,
    Mixed,
    open_mixed,
    start,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(300)]

FAIL_DB_WRITE = "fail-db-write"
PAYMENTS = 3


@pytest.fixture(scope="module")
def mixed(
    admin_db_url: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mixed]:
    """The reference pipeline with the Node worker (baggage carrier, OTLP over gRPC) and the Java
    consumer (the agent's defaults: no carrier, its spans inherit the id of their trace)."""
    m = open_mixed(
        "mixed", admin_db_url, kafka_bootstrap, tmp_path_factory.mktemp("mixed"), unique("")
    )
    try:
        yield start(m)
    finally:
        m.close(admin_db_url)


@pytest.fixture
def healthy(mixed: Mixed) -> Mixed:
    """The shared pipeline with both interop services running without faults (restarted only
    when a test left one stopped or faulty)."""
    for name in ("node", "java"):
        mixed.ensure(name)
    return mixed


@pytest.fixture(autouse=True)
async def _close_api() -> AsyncIterator[None]:
    yield
    await api.close()


def step_of(doc: dict[str, Any], sid: str) -> dict[str, Any]:
    return next(s for s in doc["steps"] if s["id"] == sid)


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


FOREIGN = ((NODE_STEP, NODE_SERVICE), (JAVA_STEP, JAVA_SERVICE))


def assert_completed(m: Mixed, doc: dict[str, Any]) -> None:
    """Every step done; the Node and Java steps by their services, matched from their own spans,
    with their timing, their effect rows and their processed marks."""
    assert (doc["state"], doc["cause"], doc["stopped_at"]) == ("completed", "completed", None)
    assert [s["status"] for s in doc["steps"]] == ["done"] * len(m.spec.steps), doc
    for sid, service in FOREIGN:
        step = step_of(doc, sid)
        assert step["service"] == service
        assert "ok" in step["outcomes"], step
        # matched from the service's own consumer span (not one hoptrace made): it says so
        assert any(f"from {service}" in line for line in step["evidence"]), step
        assert at(step["started_at"]) <= at(step["ended_at"])
        assert step["consumed"]["topic"] == m.spec.step(sid).consumes
        assert step["effect_row"] is True
    # in pipeline order, each after the one it consumes from
    starts = [at(s["started_at"]) for s in doc["steps"]]
    assert starts == sorted(starts), starts
    assert step_of(doc, NODE_STEP)["emitted"]["topic"] == m.spec.step(NODE_STEP).emits
    # payment-service only produces: its step span's messaging attributes name the record it
    # emitted, which it did not consume
    first = step_of(doc, m.spec.steps[0].id)
    assert first["consumed"] is None, first
    assert not [line for line in first["evidence"] if "consumed" in line], first
    # the processed marks of their own tables, named by the handler they write
    assert {NODE_STEP, JAVA_STEP} <= {p["source"] for p in doc["processed_events"]}


def assert_text(m: Mixed, cid: str) -> None:
    """``hoptrace trace`` (text): the foreign steps done, with their services."""
    out = m.trace_text(cid)
    for sid, service in FOREIGN:
        line = next(line for line in out.splitlines() if f" {sid} " in line)
        assert "done" in line and service in line, out


# ------------------------------------------------------------------------------ healthy


async def test_healthy_payments_complete_through_node_and_java(healthy: Mixed) -> None:
    m = healthy
    cids = [await m.pay() for _ in range(PAYMENTS)]
    for cid in cids:
        d = await m.wait_cause(cid, "completed")
        assert_completed(m, to_dict(d))
        # the collector's correlation state at ingest agrees: every step done
        row = await m.wait_state(cid, "completed")
        done = {sid for sid, st in row.steps.items() if st.done_at is not None}
        assert done == {s.id for s in m.spec.steps}
    doc = m.trace(cids[0])  # the command line, as a user runs it
    assert_completed(m, doc)
    assert_text(m, cids[0])
    assert not {s["correlation_id"] for s in m.stalls()} & set(cids)
    # the Node consumer span carries the id (baggage); the Java agent's spans carry none: its
    # run was counted at ingest and at lookup by the id of its trace
    consumers = await m.fetch(
        "SELECT service, correlation_id FROM spans WHERE trace_id = ANY($1::text[]) "
        "AND kind = $2 AND service = ANY($3::text[])",
        list(doc["trace_ids"]),
        int(SpanKind.CONSUMER),
        [NODE_SERVICE, JAVA_SERVICE],
    )
    assert sorted((r["service"], r["correlation_id"]) for r in consumers) == [
        (JAVA_SERVICE, None),
        (NODE_SERVICE, cids[0]),
    ]


def test_dashboard_lookup_draws_the_node_and_java_spans(
    healthy: Mixed, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = healthy

    async def paid() -> str:
        cid = await m.pay()
        await m.wait_cause(cid, "completed")
        await api.close()
        return cid

    cid = asyncio.run(paid())
    asyncio.run(grant_readonly(m.db_url))  # the services' own tables exist now
    for key in ("HOPTRACE_DATABASE_URL", "HOPTRACE_KAFKA_BOOTSTRAP", "HOPTRACE_PIPELINE",
                "HOPTRACE_JAEGER_URL"):  # fmt: skip
        monkeypatch.setenv(key, m.env[key])
    # the dashboard reads as the read-only role
    monkeypatch.setenv("HOPTRACE_DASHBOARD_DATABASE_URL", readonly_url(m.db_url))
    get_settings.cache_clear()
    try:
        at_ = show(AppTest.from_file(str(APP), default_timeout=60), None, {"id": cid})
        assert not at_.exception, at_.exception
        assert "Completed" in at_.success[0].value
        steps = next(md.value for md in at_.markdown if NODE_STEP in md.value)
        for sid, service in FOREIGN:
            assert f"**{sid}** ({service}," in steps, steps
        [chart] = at_.get("plotly_chart")
        figure = json.loads(chart.proto.spec)
        lanes = {t["name"]: set(t["y"]) for t in figure["data"]}
        # one bar series per service: the Node and Java services' spans in their steps' lanes
        assert NODE_STEP in lanes.get(NODE_SERVICE, set()), lanes
        assert JAVA_STEP in lanes.get(JAVA_SERVICE, set()), lanes
        assert {s.service for s in m.spec.steps} <= set(lanes), lanes
        assert cid in at_.subheader[0].value
        assert "Cause:** `completed`" in text(at_)
    finally:
        ApiSource.close_all()
        get_settings.cache_clear()


# ------------------------------------------------------------------------------ stopped, failing


async def stopped_failing_fixed(m: Mixed, name: str, sid: str, service: str) -> None:
    """One payment through an incident at the foreign step: the service is stopped
    (``no_consumer``), comes back failing its database write (``processing_error`` on the same
    record, redelivered), then healthy (the payment completes). The lookup and the collector's
    state at ingest say so at each stage."""
    step = m.spec.step(sid)
    m.stop_interop(name)
    cid = await m.pay()
    await m.wait_cause(cid, "no_consumer", at=sid)
    doc = m.trace(cid)
    assert (doc["stopped_at"], doc["cause"]) == (sid, "no_consumer")
    assert doc["state"] in ("in_progress", "stalled")  # stalled once past its deadline
    assert doc["next_action"] == f"start {service}"
    assert step_of(doc, sid)["kafka"]["group_members"] == 0
    assert any(f"consumer group {step.group}" in line for line in doc["evidence"]), doc
    before = [s for s in m.spec.steps if m.spec.index(s.id) < m.spec.index(sid)]
    assert all(step_of(doc, s.id)["status"] == "done" for s in before), doc["steps"]
    row = await m.wait_row(cid, lambda r: r.next_step == sid, f"waiting for {sid}")
    assert row.state in ("in_progress", "stalled") and row.failed_step is None

    m.start_interop(name, fault=FAIL_DB_WRITE)
    await m.wait_cause(cid, "processing_error", at=sid)
    doc = m.trace(cid)
    assert (doc["state"], doc["stopped_at"], doc["cause"]) == ("failed", sid, "processing_error")
    assert "no_such_column" in doc["evidence"][0], doc["evidence"]
    assert doc["next_action"].startswith(f"fix {service}: ")
    assert "error" in step_of(doc, sid)["outcomes"]
    assert step_of(doc, sid)["effect_row"] is False
    row = await m.wait_state(cid, "failed")
    assert row.failed_step == sid
    assert "no_such_column" in (row.error or ""), row.error  # why, as `hoptrace stalls` says
    stuck = [s for s in m.stalls() if s["correlation_id"] == cid]
    assert [(s["state"], s["step"]) for s in stuck] == [("failed", sid)], stuck

    m.ensure(name)  # fixed: the record is redelivered and goes through
    doc = to_dict(await m.wait_cause(cid, "completed"))
    assert_completed(m, doc)
    assert {"error", "ok"} <= set(step_of(doc, sid)["outcomes"])
    await m.wait_state(cid, "completed")


async def test_node_step_stopped_failing_then_fixed(healthy: Mixed) -> None:
    await stopped_failing_fixed(healthy, "node", NODE_STEP, NODE_SERVICE)


async def test_java_step_stopped_failing_then_fixed(healthy: Mixed) -> None:
    await stopped_failing_fixed(healthy, "java", JAVA_STEP, JAVA_SERVICE)


# ------------------------------------------------------------------------------ key only


@pytest.fixture(scope="module")
def key_only(
    admin_db_url: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mixed]:
    """A pipeline whose spec reads the correlation id from the Kafka message key only, run with
    no baggage anywhere: every service propagates trace context only (``OTEL_PROPAGATORS``); the
    Node worker carries the id in nothing but the key (``CARRIER=key``) and exports over
    OTLP/HTTP (chunked bodies); the Java agent uses the stable semantic conventions."""
    m = open_mixed(
        "key-only",
        admin_db_url,
        kafka_bootstrap,
        tmp_path_factory.mktemp("key_only"),
        unique(""),
        key_only=True,
        node_protocol="http/protobuf",
        node_carrier="key",
        java_options={"OTEL_SEMCONV_STABILITY_OPT_IN": "database,messaging"},
        python_extra=NO_BAGGAGE,
        interop_extra=NO_BAGGAGE,
    )
    try:
        yield start(m)
    finally:
        m.close(admin_db_url)


async def test_key_only_pipeline_completes(key_only: Mixed) -> None:
    m = key_only
    assert not m.spec.correlation.baggage and m.spec.correlation.message_key
    cids = [await m.pay() for _ in range(2)]
    for cid in cids:
        d = await m.wait_cause(cid, "completed")
        assert_completed(m, to_dict(d))
        await m.wait_state(cid, "completed")
    doc = m.trace(cids[0])
    assert_completed(m, doc)

    keys = {cid.encode() for cid in cids}
    # the stored spans: the id came from the key alone
    rows = await m.fetch(
        "SELECT service, name, correlation_id, attributes->>$2 AS key, attributes ? $3 AS tagged "
        "FROM spans WHERE trace_id = ANY($1::text[])",
        list(doc["trace_ids"]),
        conv.MSG_MESSAGE_KEY,
        conv.BAGGAGE_KEY,
    )
    # every service's spans arrived (the Node worker's as chunked OTLP/HTTP bodies)
    assert {NODE_SERVICE, JAVA_SERVICE, *PYTHON_SERVICES} <= {r["service"] for r in rows}
    with_id = [r for r in rows if r["correlation_id"] == cids[0]]
    assert with_id and all(r["key"] == cids[0] for r in with_id), with_id
    assert {NODE_SERVICE, JAVA_SERVICE} <= {r["service"] for r in with_id}
    # the Node and Java spans carry the id in nothing but the key. What remains of the attribute
    # is on hoptrace's services' spans: their runtime sets it from the record's x-correlation-id
    # header or envelope (in-process baggage), whatever the propagators; this spec ignores it
    tagged = {r["service"] for r in rows if r["tagged"]}
    assert tagged <= set(PYTHON_SERVICES), tagged
    # the records: the Node worker's carry the id only as their key; hoptrace's services still
    # add their x-correlation-id header (and the envelope its correlation_id)
    for step in m.spec.steps:
        if step.emits:
            records = [r for r in await read_topic(m.bootstrap, step.emits) if r.key in keys]
            headers = [dict(r.headers) for r in records]
            assert len(records) == len(cids), (step.emits, records)
            assert not [h for h in headers if "baggage" in h], (step.emits, headers)
            carried = [conv.CORRELATION_HEADER in h for h in headers]
            assert carried == [step.service != NODE_SERVICE] * len(cids), (step.emits, headers)


#: At ingest, hoptrace's own step spans that carry no id under the spec's carriers take their
#: trace's correlation id, as foreign runs do (before that, ingest dropped them: these two failed).


async def test_key_only_ingest_sees_hoptrace_s_own_steps(key_only: Mixed) -> None:
    m = key_only
    m.ensure("node")
    cid = await m.pay()
    await m.wait_cause(cid, "completed")
    row = await m.wait_state(cid, "completed")
    done = {sid for sid, st in row.steps.items() if st.done_at is not None}
    assert done == {s.id for s in m.spec.steps}, f"done at ingest: {sorted(done)}"


async def test_key_only_ingest_tracks_a_payment_stuck_at_the_node_step(key_only: Mixed) -> None:
    """Node stopped: the lookup says ``no_consumer`` at its step (it reads the traces), but at
    ingest the payment must be tracked too, or no stall is ever detected and no alert fires."""
    m = key_only
    m.stop_interop("node")
    try:
        cid = await m.pay()
        await m.wait_cause(cid, "no_consumer", at=NODE_STEP)
        row = await m.wait_row(cid, lambda r: r.next_step == NODE_STEP, "waiting", timeout=10)
        assert row.steps[m.spec.steps[0].id].done_at is not None
    finally:
        m.ensure("node")
