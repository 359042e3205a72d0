"""One record through two hops (real Kafka, real Postgres): one connected trace, the correlation
id on every span (incl. asyncpg and httpx), messaging attributes, and the correlation carried by
the header alone when the producer was not instrumented."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.trace import SpanKind

from hoptrace.contract import conventions as c
from hoptrace.instrumentation import (
    CORRELATION_HEADER,
    Emit,
    Envelope,
    HopContext,
    HopProducer,
    step_span,
)

from ..support import unique, wait_for
from .helpers import fetchval, read_topic, running, runtime


@pytest.fixture
def admin_url() -> Iterator[str]:
    """A stand-in HTTP dependency (real HTTP over a socket) the allocation handler calls."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"trainer": "t-1"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/allocations"
    server.shutdown()
    server.server_close()


def make_handlers(admin_url: str):
    async def purchase(ctx: HopContext) -> Emit:
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, $2)",
            ctx.correlation_id,
            ctx.envelope.payload["amount"],
        )
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    async def allocate(ctx: HopContext) -> Emit:
        async with httpx.AsyncClient() as client:
            resp = await client.post(admin_url, json={"payment_id": ctx.correlation_id})
            resp.raise_for_status()
        await ctx.conn.execute(
            "INSERT INTO trainer_allocations VALUES ($1, $2)",
            ctx.correlation_id,
            resp.json()["trainer"],
        )
        return Emit("TRAINER_ALLOCATED", {"payment_id": ctx.correlation_id})

    return purchase, allocate


async def test_two_hops_make_one_connected_trace(
    spec, topics, tables, spans, kafka_bootstrap, admin_url
):
    db_url = tables
    purchase, allocate = make_handlers(admin_url)
    rt1 = runtime(spec, purchase, kafka_bootstrap, db_url, receive_spans=True, send_spans=True)
    rt2 = runtime(spec, allocate, kafka_bootstrap, db_url, step="trainer.allocated")
    cid = unique("pay-")
    first = spec.step("payment.confirmed")
    async with running(rt1), running(rt2), HopProducer(kafka_bootstrap) as producer:
        with step_span(spec, first.id, cid) as root:
            md = await producer.emit(
                first.emits,
                Envelope.new("PURCHASE_CONFIRMED", 1, cid, {"payment_id": cid, "amount": 7}),
            )
        emitted = await read_topic(kafka_bootstrap, spec.step("trainer.allocated").emits, 1)
        await wait_for(lambda: _span_named(spans, "trainer.allocated"), what="last process span")

    assert [r for r in emitted if json.loads(r.value)["correlation_id"] == cid]
    assert await fetchval(db_url, "SELECT count(*) FROM trainer_allocations") == 1
    trace_id = root.get_span_context().trace_id
    in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in in_trace}
    # every span of the correlation is in ONE trace and carries the correlation id
    others = [
        s
        for s in spans.get_finished_spans()
        if (s.attributes or {}).get(c.ATTR_CORRELATION_ID) == cid and s.context.trace_id != trace_id
    ]
    assert others == []
    missing = [s.name for s in in_trace if (s.attributes or {}).get(c.ATTR_CORRELATION_ID) != cid]
    assert missing == []

    # parent links: step span -> send -> process (hop 1) -> send -> process (hop 2)
    root_span = by_name[first.id]
    assert root_span.parent is None
    assert root_span.attributes[c.ATTR_EMIT_TOPIC] == first.emits
    assert root_span.attributes[c.ATTR_EMIT_OFFSET] == md.offset
    send1 = by_name[f"{first.emits} send"]
    assert send1.parent.span_id == root_span.context.span_id
    p1 = by_name["purchase.created"]
    assert p1.parent.span_id == send1.context.span_id
    assert p1.kind is SpanKind.CONSUMER
    send2 = by_name[f"{spec.step('purchase.created').emits} send"]
    assert send2.parent.span_id == p1.context.span_id
    p2 = by_name["trainer.allocated"]
    assert p2.parent.span_id == send2.context.span_id
    # the aiokafka receive span (kept on hop 1 only) is a sibling of the process span
    recv1 = by_name[f"{first.emits} receive"]
    assert recv1.parent.span_id == send1.context.span_id
    assert f"{spec.step('purchase.created').emits} receive" not in by_name

    # step span attributes (the span conventions of hoptrace.contract.conventions)
    for span, step_id in ((p1, "purchase.created"), (p2, "trainer.allocated")):
        step = spec.step(step_id)
        a = span.attributes
        assert a[c.ATTR_PIPELINE] == "payments"
        assert a[c.ATTR_STEP] == step_id
        assert a[c.ATTR_OUTCOME] == "ok"
        assert a[c.MSG_DESTINATION] == step.consumes
        assert a[c.MSG_GROUP] == step.group
        assert isinstance(a[c.MSG_OFFSET], int)
        assert a[c.MSG_PARTITION] in {"0", "1", "2"}
        assert a[c.ATTR_EMIT_TOPIC] == step.emits
        assert isinstance(a[c.ATTR_EMIT_OFFSET], int)

    # asyncpg spans under each process span, httpx span under the allocation span
    db_spans = [
        s
        for s in in_trace
        if (s.attributes or {}).get("db.system") == "postgresql"
        or (s.attributes or {}).get("db.system.name") == "postgresql"
    ]
    assert {s.parent.span_id for s in db_spans} >= {p1.context.span_id, p2.context.span_id}
    http_spans = [
        s
        for s in in_trace
        if s.kind is SpanKind.CLIENT
        and s.parent
        and s.parent.span_id == p2.context.span_id
        and s not in db_spans
    ]
    assert http_spans, [s.name for s in in_trace]
    assert all(s.attributes[c.ATTR_CORRELATION_ID] == cid for s in db_spans + http_spans)


async def test_correlation_survives_uninstrumented_producer(
    spec, topics, tables, spans, kafka_bootstrap
):
    """No traceparent, no baggage: only the x-correlation-id header (and the payload)."""
    db_url = tables
    seen: list[str] = []

    async def purchase(ctx: HopContext) -> Emit:
        seen.append(ctx.correlation_id)
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, 1)", ctx.correlation_id
        )
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    rt = runtime(spec, purchase, kafka_bootstrap, db_url)
    via_header, via_payload = unique("hdr-"), unique("pl-")
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    send = AIOKafkaProducer.send.__wrapped__  # the un-instrumented aiokafka send
    topic = spec.step("payment.confirmed").emits
    await raw.start()
    try:
        env = Envelope.new("PURCHASE_CONFIRMED", 1, "", {"amount": 1})
        fut = await send(
            raw,
            topic,
            env.to_bytes(),
            None,
            None,
            None,
            [(CORRELATION_HEADER, via_header.encode())],
        )
        md = await fut
        env2 = Envelope.new("PURCHASE_CONFIRMED", 1, "", {"payment_id": via_payload})
        await (await send(raw, topic, env2.to_bytes(), None, None, None, []))
    finally:
        await raw.stop()
    async with running(rt):
        await wait_for(
            lambda: fetchval(db_url, "SELECT count(*) = 2 FROM student_course_purchases")
        )
        out = await read_topic(kafka_bootstrap, spec.step("purchase.created").emits, 2)

    assert sorted(seen) == sorted([via_header, via_payload])
    for r in out:
        # the next hop carries it everywhere again: header, envelope, baggage
        env_out = json.loads(r.value)
        hdrs = dict(r.headers)
        assert hdrs[CORRELATION_HEADER].decode() == env_out["correlation_id"]
        assert f"hoptrace.correlation_id={env_out['correlation_id']}" in hdrs["baggage"].decode()
    proc = [s for s in spans.get_finished_spans() if s.name == "purchase.created"]
    by_cid = {s.attributes[c.ATTR_CORRELATION_ID]: s for s in proc}
    assert set(by_cid) == {via_header, via_payload}
    hdr_span = by_cid[via_header]
    assert hdr_span.attributes[c.MSG_OFFSET] == md.offset
    db = [
        s
        for s in spans.get_finished_spans()
        if s.parent
        and s.parent.span_id == hdr_span.context.span_id
        and s.name != "purchase.created"
        and s.kind is SpanKind.CLIENT
    ]
    assert db and all(s.attributes[c.ATTR_CORRELATION_ID] == via_header for s in db)


async def _span_named(spans, name: str) -> bool:
    return any(s.name == name for s in spans.get_finished_spans())
