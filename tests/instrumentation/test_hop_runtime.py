"""The hop runtime on real Kafka and Postgres: crash between write and offset commit, effect
verification, retries, dead-lettering of poison records."""

from __future__ import annotations

import json

from aiokafka import AIOKafkaProducer
from opentelemetry.trace import StatusCode

from hoptrace.contract import conventions as c
from hoptrace.instrumentation import (
    CORRELATION_HEADER,
    Emit,
    Envelope,
    HopContext,
    HopHooks,
    HopProducer,
    PoisonRecord,
    RetryableError,
    next_event_id,
)

from ..support import unique, wait_for
from .helpers import committed, fetchval, header, read_topic, running, runtime


class Crash(BaseException):
    """Simulated process death (not an Exception: nothing in the runtime may swallow it)."""


async def emit_payment(spec, kafka_bootstrap, cid: str, **payload) -> Envelope:
    env = Envelope.new("PURCHASE_CONFIRMED", 1, cid, {"payment_id": cid, **payload})
    async with HopProducer(kafka_bootstrap) as producer:
        await producer.emit(spec.step("payment.confirmed").emits, env)
    return env


async def test_redelivery_after_crash_between_write_and_commit_is_a_noop(
    spec, topics, tables, spans, kafka_bootstrap
):
    db_url = tables
    calls: list[str] = []

    async def purchase(ctx: HopContext) -> Emit:
        calls.append(ctx.envelope.event_id)
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, 5)", ctx.correlation_id
        )
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id, "n": len(calls)})

    async def crash(ctx: HopContext) -> None:
        raise Crash()

    cid = unique("pay-")
    src = await emit_payment(spec, kafka_bootstrap, cid)
    step = spec.step("purchase.created")
    rt1 = runtime(spec, purchase, kafka_bootstrap, db_url, hooks=HopHooks(after_db_commit=crash))
    try:
        async with running(rt1) as task:
            await wait_for(lambda: _done(task), what="the crash")
    except Crash:
        pass
    assert rt1.stats["ok"] == 0
    # the write and the processed mark committed; nothing emitted; offset not committed
    assert await fetchval(db_url, "SELECT count(*) FROM student_course_purchases") == 1
    assert (
        await fetchval(
            db_url, "SELECT source FROM processed_events WHERE event_id = $1", src.event_id
        )
        == "purchase.created"
    )
    assert await committed(kafka_bootstrap, step.group, step.consumes) == {}

    rt2 = runtime(spec, purchase, kafka_bootstrap, db_url)
    async with running(rt2):
        out = await read_topic(kafka_bootstrap, step.emits, 1)
        await wait_for(lambda: _committed_any(kafka_bootstrap, step), what="offset commit")
    assert rt2.stats == {**rt2.stats, "duplicate": 1, "ok": 0}
    assert calls == [src.event_id]  # the handler ran once, not on the redelivery
    assert await fetchval(db_url, "SELECT count(*) FROM student_course_purchases") == 1
    # the re-emitted next event is the one stored at the first attempt (deterministic id)
    assert len(out) == 1
    nxt = json.loads(out[0].value)
    assert nxt["event_id"] == next_event_id(src.event_id, "purchase.created")
    assert nxt["payload"] == {"payment_id": cid, "n": 1}
    dup = [s for s in spans.get_finished_spans() if s.name == "purchase.created"]
    assert [s.attributes[c.ATTR_OUTCOME] for s in dup if c.ATTR_OUTCOME in s.attributes] == [
        "duplicate"
    ]
    assert dup[-1].attributes[c.ATTR_EMIT_TOPIC] == step.emits


async def test_effect_missing_is_not_marked_retried_then_dead_lettered(
    spec, topics, tables, spans, kafka_bootstrap
):
    db_url = tables
    attempts: list[int] = []

    async def forgetful(ctx: HopContext) -> Emit:
        attempts.append(ctx.attempt)  # "succeeds" but writes no row
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    cid = unique("pay-")
    src = await emit_payment(spec, kafka_bootstrap, cid)
    step = spec.step("purchase.created")
    rt = runtime(spec, forgetful, kafka_bootstrap, db_url, max_attempts=3, backoff_s=0.01)
    async with running(rt):
        dlq = await read_topic(kafka_bootstrap, step.dlq, 1)
        await wait_for(lambda: _committed_any(kafka_bootstrap, step), what="offset commit")
    assert attempts == [1, 2, 3]
    assert await fetchval(db_url, "SELECT count(*) FROM processed_events") == 0
    assert json.loads(dlq[0].value)["event_id"] == src.event_id
    assert "effect missing" in header(dlq[0], c.DLQ_REASON_HEADER)
    assert header(dlq[0], c.DLQ_ATTEMPTS_HEADER) == "3"
    assert header(dlq[0], CORRELATION_HEADER) == cid
    assert header(dlq[0], c.DLQ_SOURCE_TOPIC_HEADER) == step.consumes
    span = next(s for s in spans.get_finished_spans() if s.name == "purchase.created")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[c.ATTR_OUTCOME] == "error"
    assert len([e for e in span.events if e.name == "exception"]) == 3
    # nothing went downstream
    assert rt.stats["dead_lettered"] == 1 and rt.stats["retries"] == 2


async def test_legacy_no_verify_marks_without_effect(spec, topics, tables, spans, kafka_bootstrap):
    """verify_effect=False reproduces the incident: marked processed, no row, event emitted."""
    db_url = tables

    async def forgetful(ctx: HopContext) -> Emit:
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    cid = unique("pay-")
    await emit_payment(spec, kafka_bootstrap, cid)
    rt = runtime(spec, forgetful, kafka_bootstrap, db_url, verify_effect=False)
    async with running(rt):
        await read_topic(kafka_bootstrap, spec.step("purchase.created").emits, 1)
    assert (
        await fetchval(
            db_url, "SELECT count(*) FROM processed_events WHERE correlation_id = $1", cid
        )
        == 1
    )
    assert await fetchval(db_url, "SELECT count(*) FROM student_course_purchases") == 0


async def test_retryable_error_backs_off_then_succeeds(
    spec, topics, tables, spans, kafka_bootstrap
):
    db_url = tables
    attempts: list[int] = []

    async def flaky(ctx: HopContext) -> Emit:
        attempts.append(ctx.attempt)
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, 1)", ctx.correlation_id
        )
        if ctx.attempt == 1:
            raise RetryableError("admin-service busy")  # rolls back the insert above
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    await emit_payment(spec, kafka_bootstrap, unique("pay-"))
    rt = runtime(spec, flaky, kafka_bootstrap, db_url, backoff_s=0.01)
    async with running(rt):
        await read_topic(kafka_bootstrap, spec.step("purchase.created").emits, 1)
    assert attempts == [1, 2]
    assert await fetchval(db_url, "SELECT count(*) FROM student_course_purchases") == 1
    span = next(s for s in spans.get_finished_spans() if s.name == "purchase.created")
    assert span.attributes[c.ATTR_OUTCOME] == "ok"
    assert span.attributes[c.ATTR_ATTEMPTS] == 2
    types = [e.attributes["exception.type"] for e in span.events if e.name == "exception"]
    assert [t.rsplit(".", 1)[-1] for t in types] == ["RetryableError"]


async def test_poison_records_go_to_dlq_and_the_consumer_keeps_going(
    spec, topics, tables, spans, kafka_bootstrap
):
    db_url = tables
    handled: list[str] = []

    async def purchase(ctx: HopContext) -> Emit:
        handled.append(ctx.correlation_id)
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, 1)", ctx.correlation_id
        )
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    def validate(env: Envelope) -> None:
        if env.type != "PURCHASE_CONFIRMED" or env.version != 1:
            raise PoisonRecord(f"unexpected event {env.type} v{env.version}")

    step = spec.step("purchase.created")
    topic = step.consumes
    good = unique("good-")
    no_cid = Envelope.new("PURCHASE_CONFIRMED", 1, "", {"amount": 1})
    poison = [
        (b"this is not json", "not JSON"),
        (json.dumps({"type": "PURCHASE_CONFIRMED", "payload": {}}).encode(), "schema mismatch"),
        (Envelope.new("PURCHASE_CONFIRMED", 2, "p-v2", {}).to_bytes(), "unexpected event"),
        (no_cid.to_bytes(), "no correlation id"),
    ]
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await raw.start()
    try:
        send = AIOKafkaProducer.send.__wrapped__  # no tracing headers, no correlation header
        for value, _ in poison:
            await (await send(raw, topic, value, b"k", 0, None, []))
        await (
            await send(
                raw,
                topic,
                Envelope.new("PURCHASE_CONFIRMED", 1, good, {}).to_bytes(),
                b"k",
                0,
                None,
                [],
            )
        )
    finally:
        await raw.stop()

    rt = runtime(spec, purchase, kafka_bootstrap, db_url, validate=validate)
    async with running(rt):
        dlq = await read_topic(kafka_bootstrap, step.dlq, len(poison))
        await read_topic(kafka_bootstrap, step.emits, 1)
        await wait_for(
            lambda: _committed_is(kafka_bootstrap, step, {0: 5}), what="offsets moved on"
        )
    assert handled == [good]
    assert len(dlq) == len(poison)
    dlq.sort(key=lambda r: int(header(r, c.DLQ_SOURCE_OFFSET_HEADER)))
    for record, (value, reason) in zip(dlq, poison, strict=True):
        assert record.value == value  # parked as it was
        assert reason in header(record, c.DLQ_REASON_HEADER)
        assert header(record, c.DLQ_STEP_HEADER) == "purchase.created"
        assert header(record, c.DLQ_ERROR_HEADER) == "PoisonRecord"
    err = [
        s
        for s in spans.get_finished_spans()
        if s.name == "purchase.created" and s.attributes.get(c.ATTR_OUTCOME) == "error"
    ]
    assert len(err) == len(poison)
    assert all(s.status.status_code is StatusCode.ERROR for s in err)
    assert all(s.attributes[c.ATTR_DLQ_TOPIC] == step.dlq for s in err)
    assert rt.stats["dead_lettered"] == len(poison) and rt.stats["ok"] == 1


async def test_non_retryable_handler_error_dead_letters_at_once(
    spec, topics, tables, spans, kafka_bootstrap
):
    db_url = tables
    calls = 0

    async def broken(ctx: HopContext) -> Emit:
        nonlocal calls
        calls += 1
        raise KeyError("course_id")

    await emit_payment(spec, kafka_bootstrap, unique("pay-"))
    rt = runtime(spec, broken, kafka_bootstrap, db_url, backoff_s=0.01)
    async with running(rt):
        dlq = await read_topic(kafka_bootstrap, spec.step("purchase.created").dlq, 1)
    assert calls == 1
    assert "non-retryable KeyError" in header(dlq[0], c.DLQ_REASON_HEADER)


async def _done(task) -> bool:
    return task.done()


async def _committed_any(bootstrap, step) -> bool:
    return bool(await committed(bootstrap, step.group, step.consumes))


async def _committed_is(bootstrap, step, expected) -> bool:
    return await committed(bootstrap, step.group, step.consumes) == expected


async def test_lost_db_connection_is_retried_on_a_new_one(
    spec, topics, tables, spans, kafka_bootstrap
):
    """The backend dies mid-transaction (real pg_terminate_backend): retried on a fresh
    connection, written once."""
    import asyncpg

    db_url = tables
    attempts: list[int] = []

    async def purchase(ctx: HopContext) -> Emit:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            pid = await ctx.conn.fetchval("SELECT pg_backend_pid()")
            admin = await asyncpg.connect(db_url)
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, 1)", ctx.correlation_id
        )
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    await emit_payment(spec, kafka_bootstrap, unique("pay-"))
    rt = runtime(spec, purchase, kafka_bootstrap, db_url, backoff_s=0.01)
    async with running(rt):
        await read_topic(kafka_bootstrap, spec.step("purchase.created").emits, 1)
    assert attempts == [1, 2]
    assert await fetchval(db_url, "SELECT count(*) FROM student_course_purchases") == 1
    assert await fetchval(db_url, "SELECT count(*) FROM processed_events") == 1
    assert rt.stats["ok"] == 1 and rt.stats["retries"] == 1


async def test_concurrent_mark_turns_into_duplicate(spec, topics, tables, spans, kafka_bootstrap):
    """Another consumer of the same step marks the same event while this one is handling it
    (e.g. after a rebalance): the unique violation rolls this attempt back and the retry sees a
    duplicate. (Marks are keyed by event and step: the other consumer's mark names this step.)"""
    import asyncpg

    db_url = tables
    calls = 0

    async def purchase(ctx: HopContext) -> Emit:
        nonlocal calls
        calls += 1
        other = await asyncpg.connect(db_url)
        try:
            await other.execute(
                "INSERT INTO student_course_purchases VALUES ($1, 1)", ctx.correlation_id
            )
            await other.execute(
                "INSERT INTO processed_events (event_id, event_type, correlation_id, source)"
                " VALUES ($1, $2, $3, 'purchase.created')",
                ctx.envelope.event_id,
                ctx.envelope.type,
                ctx.correlation_id,
            )
        finally:
            await other.close()
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    src = await emit_payment(spec, kafka_bootstrap, unique("pay-"))
    rt = runtime(spec, purchase, kafka_bootstrap, db_url, backoff_s=0.01)
    async with running(rt):
        await wait_for(lambda: _async(rt.stats["duplicate"] == 1), what="the duplicate outcome")
    assert calls == 1
    # the one mark is the other consumer's (it recorded no emitted event; this one would have)
    assert (
        await fetchval(
            db_url,
            "SELECT count(*) FILTER (WHERE emitted IS NULL) || '/' || count(*)"
            " FROM processed_events WHERE event_id = $1",
            src.event_id,
        )
        == "1/1"
    )
    span = next(s for s in spans.get_finished_spans() if s.name == "purchase.created")
    assert span.attributes[c.ATTR_OUTCOME] == "duplicate"


async def _async(value: object) -> object:
    return value


async def test_a_handler_savepoint_rolls_back_alone(spec, topics, tables, spans, kafka_bootstrap):
    """The hop's transaction is asyncpg's: a handler's ``conn.transaction()`` is a savepoint
    inside it; a failed savepoint undoes only its own writes, the step's row and mark stay."""
    db_url = tables

    async def purchase(ctx: HopContext) -> Emit:
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, 5)", ctx.correlation_id
        )
        try:
            async with ctx.conn.transaction():
                await ctx.conn.execute(
                    "INSERT INTO student_course_purchases VALUES ($1, 6)", ctx.correlation_id + "x"
                )
                raise ValueError("undo the savepoint")
        except ValueError:
            pass
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    cid = unique("pay-")
    await emit_payment(spec, kafka_bootstrap, cid)
    rt = runtime(spec, purchase, kafka_bootstrap, db_url)
    async with running(rt):
        await read_topic(kafka_bootstrap, spec.step("purchase.created").emits, 1)
    assert rt.stats["ok"] == 1 and rt.stats.get("error", 0) == 0
    rows = await fetchval(
        db_url,
        "SELECT string_agg(correlation_id, ',') FROM student_course_purchases"
        " WHERE correlation_id LIKE $1",
        cid + "%",
    )
    assert rows == cid
    marks = "SELECT count(*) FROM processed_events WHERE correlation_id = $1"
    assert await fetchval(db_url, marks, cid) == 1
