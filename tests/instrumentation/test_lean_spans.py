"""The hop runtime's default span shape (real Kafka, real Postgres): no aiokafka receive or
send span; the trace stays connected through the process spans (the emitted record's
traceparent names this hop's process span), the correlation travels in baggage, the
x-correlation-id header and the payload, and the handler's asyncpg span carries it."""

from __future__ import annotations

import json

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
from .helpers import read_topic, running, runtime


async def purchase(ctx: HopContext) -> Emit:
    """The purchase step's handler: its one row, then the next event."""
    await ctx.conn.execute(
        "INSERT INTO student_course_purchases VALUES ($1, $2)", ctx.correlation_id, 3
    )
    return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})


async def test_default_hops_link_process_spans_directly(
    spec, topics, tables, spans, kafka_bootstrap
):
    db_url = tables

    async def allocate(ctx: HopContext) -> Emit:
        await ctx.conn.execute(
            "INSERT INTO trainer_allocations VALUES ($1, $2)", ctx.correlation_id, "t-9"
        )
        return Emit("TRAINER_ALLOCATED", {"payment_id": ctx.correlation_id})

    rt1 = runtime(spec, purchase, kafka_bootstrap, db_url)
    rt2 = runtime(spec, allocate, kafka_bootstrap, db_url, step="trainer.allocated")
    cid = unique("pay-")
    first = spec.step("payment.confirmed")
    async with running(rt1), running(rt2), HopProducer(kafka_bootstrap) as producer:
        with step_span(spec, first.id, cid) as root:
            await producer.emit(
                first.emits,
                Envelope.new("PURCHASE_CONFIRMED", 1, cid, {"payment_id": cid, "amount": 3}),
            )

        async def done() -> bool:
            return any(s.name == "trainer.allocated" for s in spans.get_finished_spans())

        await wait_for(done, what="the second hop's process span")
        out = await read_topic(kafka_bootstrap, spec.step("purchase.created").emits, 1)

    trace_id = root.get_span_context().trace_id
    in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    names = [s.name for s in in_trace]
    by_name = {s.name: s for s in in_trace}
    # producer-only first step: its send span (HopProducer's default) is kept
    send0 = by_name[f"{first.emits} send"]
    assert send0.kind is SpanKind.PRODUCER and send0.parent.span_id == root.context.span_id
    assert send0.attributes[c.MSG_DESTINATION] == first.emits
    assert send0.attributes[c.MSG_PARTITION] in {"0", "1", "2"}
    assert send0.attributes[c.ATTR_CORRELATION_ID] == cid
    # the hops: no receive/send spans; process span -> process span
    hop_emits = spec.step("purchase.created").emits
    assert f"{hop_emits} send" not in names
    receives = [s for s in in_trace if s.name.endswith(" receive")]  # read_topic's are ours
    groups = {(s.attributes or {}).get(c.MSG_GROUP) for s in receives}
    assert not groups & {rt1.group, rt2.group}
    p1, p2 = by_name["purchase.created"], by_name["trainer.allocated"]
    assert p1.parent.span_id == send0.context.span_id
    assert p2.parent.span_id == p1.context.span_id
    assert p1.attributes[c.ATTR_EMIT_TOPIC] == hop_emits
    assert isinstance(p1.attributes[c.ATTR_EMIT_OFFSET], int)
    # every span of the trace carries the correlation id; each hop has its asyncpg span
    assert all((s.attributes or {}).get(c.ATTR_CORRELATION_ID) == cid for s in in_trace), names
    for p in (p1, p2):
        assert [
            s
            for s in in_trace
            if s.kind is SpanKind.CLIENT and s.parent.span_id == p.context.span_id
        ]
    # the emitted record carries the correlation three ways and names p1 as the parent
    (record,) = [r for r in out if json.loads(r.value)["correlation_id"] == cid]
    hdrs = dict(record.headers)
    assert hdrs[CORRELATION_HEADER].decode() == cid
    assert f"{c.ATTR_CORRELATION_ID}={cid}" in hdrs["baggage"].decode()
    assert f"{p1.context.span_id:016x}" in hdrs["traceparent"].decode()


async def test_bookkeeping_statements_make_spans_only_when_asked(
    spec, topics, tables, spans, kafka_bootstrap
):
    """The runtime's own statements (BEGIN, guard, mark, COMMIT) go around the asyncpg
    instrumentation: a hop's only asyncpg span is its handler's. ``trace_bookkeeping=True``
    brings the guard and mark spans back (BEGIN/COMMIT never have one)."""

    children: dict[bool, list[str]] = {}
    for traced in (False, True):
        rt = runtime(spec, purchase, kafka_bootstrap, tables, trace_bookkeeping=traced)
        cid = unique("pay-")
        async with running(rt), HopProducer(kafka_bootstrap) as producer:
            await producer.emit(
                spec.step("payment.confirmed").emits,
                Envelope.new("PURCHASE_CONFIRMED", 1, cid, {"payment_id": cid, "amount": 3}),
            )

            def process_span(cid: str = cid):  # noqa: ANN202
                return next(
                    (
                        s
                        for s in spans.get_finished_spans()
                        if s.name == "purchase.created"
                        and (s.attributes or {}).get(c.ATTR_CORRELATION_ID) == cid
                    ),
                    None,
                )

            async def processed(cid: str = cid) -> bool:
                return process_span(cid) is not None

            await wait_for(processed, what="the hop's process span")
        p = process_span(cid)
        assert p.attributes[c.ATTR_OUTCOME] == "ok"
        children[traced] = sorted(
            (s.attributes or {}).get("db.statement", s.name)
            for s in spans.get_finished_spans()
            if s.kind is SpanKind.CLIENT and s.parent and s.parent.span_id == p.context.span_id
        )
    assert children[False] == ["INSERT INTO student_course_purchases VALUES ($1, $2)"]
    assert len(children[True]) == 3, children[True]
    assert any("FROM processed_events WHERE event_id" in s for s in children[True])
    assert any(s.startswith("INSERT INTO processed_events") for s in children[True])
    assert not any(s.split()[0] in {"BEGIN", "COMMIT"} for s in children[True])
