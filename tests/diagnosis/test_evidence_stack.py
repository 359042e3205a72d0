"""Evidence gathering against the real Kafka and PostgreSQL, with hand-made topics, groups, records
and rows (no workers): each Kafka/DB fact that decides a cause is read from the real servers."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from hoptrace.collector import api, schema
from hoptrace.contract import load_spec
from hoptrace.instrumentation.hop import ensure_processed_events
from hoptrace.settings import PROJECT_ROOT, get_settings
from hoptrace.workers.schema import migrate as migrate_business

from ..support import create_topics, delete_topics

pytestmark = pytest.mark.stack


@pytest.fixture
async def env(hoptrace_env: dict[str, str], db_url: str, spec_path: Path, kafka_bootstrap: str):
    """A store + business schema in this test's database; topics deleted afterwards."""
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=7))
        await ensure_processed_events(conn)
    finally:
        await conn.close()
    await migrate_business(db_url)
    spec = load_spec(spec_path)
    created: list[str] = []

    class Env:
        pass

    e = Env()
    e.spec, e.db_url, e.bootstrap, e.env, e.topics = (
        spec,
        db_url,
        kafka_bootstrap,
        hoptrace_env,
        created,
    )
    yield e
    await api.close()
    await delete_topics(kafka_bootstrap, created)


async def topics(e, names: list[str]) -> None:
    await create_topics(e.bootstrap, names)
    e.topics.extend(names)


async def produce(e, topic: str, cid: str, headers: list | None = None) -> tuple[int, int]:
    p = AIOKafkaProducer(bootstrap_servers=e.bootstrap)
    await p.start()
    try:
        md = await p.send_and_wait(
            topic,
            b"{}",
            key=cid.encode(),
            headers=[("x-correlation-id", cid.encode())] + (headers or []),
        )
    finally:
        await p.stop()
    return md.partition, md.offset


async def insert_span(
    e, cid: str, step_id: str, outcome: str = "ok", at: datetime | None = None, **attrs
) -> None:
    step = e.spec.step(step_id)
    start = at or datetime.now(UTC)
    a = {"hoptrace.step": step_id, "hoptrace.step.outcome": outcome, "hoptrace.correlation_id": cid}
    a.update(attrs)
    conn = await asyncpg.connect(e.db_url)
    try:
        await conn.execute(
            "INSERT INTO spans (trace_id, span_id, name, service, kind, start_time, end_time, duration_us,"
            " status_code, status_message, correlation_id, pipeline, step, outcome, attributes)"
            " VALUES ($1,$2,$3,$4,5,$5,$6,1000,$7,$8,$9,$10,$3,$11,$12::jsonb)",
            uuid.uuid4().hex,
            uuid.uuid4().hex[:16],
            step_id,
            step.service,
            start,
            start + timedelta(milliseconds=1),
            2 if outcome == "error" else 1,
            attrs.get("msg"),
            cid,
            e.spec.name,
            outcome,
            json.dumps(a),
        )
    finally:
        await conn.close()


async def emitted_through(e, cid: str, upto: str, at: datetime | None = None) -> tuple[int, int]:
    """Spans for every step up to ``upto`` (inclusive), each with a real emitted record."""
    part = off = -1
    for step in e.spec.steps:
        attrs = {}
        if step.emits:
            part, off = await produce(e, step.emits, cid)
            attrs = {
                "hoptrace.emit.topic": step.emits,
                "hoptrace.emit.partition": part,
                "hoptrace.emit.offset": off,
            }
        await insert_span(e, cid, step.id, at=at, **attrs)
        await effect_row(e, step.table, cid)
        if step.id == upto:
            break
    return part, off


EFFECT_SQL = {
    "payments": "INSERT INTO payments (payment_id, correlation_id, student, course, amount, status)"
    " VALUES ($1, $1, 'student-1', 'course-1', 10, 'succeeded')",
    "student_course_purchases": "INSERT INTO student_course_purchases (correlation_id, payment_id,"
    " student, course) VALUES ($1, $1, 'student-1', 'course-1')",
    "trainer_allocations": "INSERT INTO trainer_allocations (correlation_id, student, course, trainer)"
    " VALUES ($1, 'student-1', 'course-1', 'trainer-1')",
}


async def effect_row(e, table: str | None, cid: str) -> None:
    if table in EFFECT_SQL:
        await row(e, EFFECT_SQL[table], cid)


async def row(e, sql: str, *args) -> None:
    conn = await asyncpg.connect(e.db_url)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


def cli(e, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hoptrace.cli", *args],
        env={
            **e.env,
            "HOPTRACE_JAEGER_URL": "http://jaeger.test:16686",
            "PYTHONPATH": str(PROJECT_ROOT),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_no_consumer_when_the_group_does_not_exist(env) -> None:
    e = env
    await topics(e, e.spec.topics)
    cid = f"pay-{uuid.uuid4().hex[:8]}"
    part, off = await emitted_through(e, cid, "purchase.created")
    d = await api.diagnose(cid)
    assert (d.stopped_at, d.cause) == ("trainer.allocated", "no_consumer")
    kf = d.facts.kafka["trainer.allocated"]
    assert kf.topic_exists and kf.group_exists is False
    assert kf.record.partition == part and kf.record.offset == off
    assert kf.end_offset == off + 1
    assert d.next_action == "start allocation-worker"
    # the command line: JSON with the stable fields, Jaeger links, exit 0
    out = cli(e, "trace", cid, "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    schema_doc = json.loads((PROJECT_ROOT / "docs" / "trace-json-schema.json").read_text())
    jsonschema.validate(doc, schema_doc)
    assert (doc["version"], doc["stopped_at"], doc["cause"]) == (
        1,
        "trainer.allocated",
        "no_consumer",
    )
    assert doc["steps"][0]["jaeger_urls"][0].startswith("http://jaeger.test:16686/trace/")
    text = cli(e, "trace", cid)
    assert text.returncode == 0 and "▶" in text.stdout and "no_consumer" in text.stdout
    md = cli(e, "trace", cid, "--format", "markdown")
    assert md.returncode == 0 and "### Kafka" in md.stdout and "processed_events" in md.stdout


async def test_wrong_group_names_the_group_that_consumes_instead(env) -> None:
    e = env
    await topics(e, e.spec.topics)
    cid = f"pay-{uuid.uuid4().hex[:8]}"
    part, off = await emitted_through(e, cid, "purchase.created")
    topic = e.spec.step("trainer.allocated").consumes
    wrong = e.spec.step("trainer.allocated").group + "-v2"
    c = AIOKafkaConsumer(bootstrap_servers=e.bootstrap, group_id=wrong, enable_auto_commit=False)
    await c.start()
    try:
        c.assign([TopicPartition(topic, part)])
        await c.commit({TopicPartition(topic, part): off + 1})
    finally:
        await c.stop()
    d = await api.diagnose(cid)
    assert (d.stopped_at, d.cause) == ("trainer.allocated", "no_consumer")
    assert wrong in d.facts.kafka["trainer.allocated"].other_groups
    assert wrong in d.next_action


async def test_wrong_group_live_with_nothing_committed_is_named(env) -> None:
    """The worker runs under another group id that has joined and was assigned the topic but has
    committed nothing yet (a new group starts at the end of the log): its live members name it."""
    e = env
    await topics(e, e.spec.topics)
    cid = f"pay-{uuid.uuid4().hex[:8]}"
    await emitted_through(e, cid, "purchase.created")
    step = e.spec.step("trainer.allocated")
    wrong = step.group + "-v2"
    c = AIOKafkaConsumer(
        step.consumes,
        bootstrap_servers=e.bootstrap,
        group_id=wrong,
        client_id="allocation-misconfigured",
        enable_auto_commit=False,
        auto_offset_reset="latest",
    )
    await c.start()
    try:
        from ..support import wait_for

        async def assigned() -> bool:
            return bool(c.assignment())

        await wait_for(assigned, 20, what="the wrong group's assignment")
        d = await api.diagnose(cid)
        out = cli(e, "trace", cid, "--format", "json")  # the JSON names the members too
    finally:
        await c.stop()
    assert (d.stopped_at, d.cause) == ("trainer.allocated", "no_consumer"), d.evidence
    kf = d.facts.kafka["trainer.allocated"]
    assert kf.group_exists is False and kf.other_groups == (wrong,)
    [member] = kf.other_members
    assert (member.group, member.client_id, member.partitions) == (
        wrong,
        "allocation-misconfigured",
        (0, 1, 2),
    )
    assert any(
        f"group {wrong} consumes {step.consumes}: 1 live member(s): allocation-misconfigured at"
        in line
        for line in d.evidence
    ), d.evidence
    assert d.next_action.startswith(f"fix the group id of {step.service}: run it with consumer")
    assert wrong in d.next_action
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    schema_doc = json.loads((PROJECT_ROOT / "docs" / "trace-json-schema.json").read_text())
    jsonschema.validate(doc, schema_doc)
    alloc = next(s for s in doc["steps"] if s["id"] == "trainer.allocated")
    [listed] = alloc["kafka"]["other_members"]
    assert (listed["group"], listed["client_id"], listed["partitions"]) == (
        wrong,
        "allocation-misconfigured",
        [0, 1, 2],
    )


async def test_consumer_lag_when_the_group_has_members_but_has_not_reached_the_record(env) -> None:
    e = env
    await topics(e, e.spec.topics)
    cid = f"pay-{uuid.uuid4().hex[:8]}"
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    part, off = await emitted_through(e, cid, "purchase.created", at=long_ago)
    step = e.spec.step("trainer.allocated")
    c = AIOKafkaConsumer(
        step.consumes, bootstrap_servers=e.bootstrap, group_id=step.group, enable_auto_commit=False
    )
    await c.start()
    try:
        from ..support import wait_for

        async def has_member() -> bool:
            return bool(c.assignment())

        await wait_for(has_member, 20, what="consumer assignment")
        d = await api.diagnose(cid)
    finally:
        await c.stop()
    assert (d.stopped_at, d.cause) == ("trainer.allocated", "consumer_lag"), d.evidence
    assert d.facts.kafka["trainer.allocated"].group_members == 1
    assert d.step("trainer.allocated").status == "stalled"


async def test_topic_missing(env) -> None:
    e = env
    missing = e.spec.step("trainer.allocated").consumes
    await topics(e, [t for t in e.spec.topics if t != missing])
    cid = f"pay-{uuid.uuid4().hex[:8]}"
    await emitted_through(e, cid, "payment.confirmed")
    await insert_span(
        e, cid, "purchase.created", "error", msg="KafkaTimeoutError: UnknownTopicOrPartitionError"
    )
    d = await api.diagnose(cid)
    assert (d.stopped_at, d.cause) == ("purchase.created", "topic_missing"), d.evidence
    assert d.next_action.startswith(f"create topic {missing}")


async def test_dead_lettered_record_is_found_with_its_reason(env) -> None:
    e = env
    await topics(e, e.spec.topics)
    cid = f"pay-{uuid.uuid4().hex[:8]}"
    await emitted_through(e, cid, "purchase.created")
    dlq = e.spec.step("trainer.allocated").dlq
    await produce(e, dlq, f"other-{cid}", headers=[("x-dlq-reason", b"unrelated")])
    p, o = await produce(
        e, dlq, cid, headers=[("x-dlq-reason", b"gave up after 5 attempts: KeyError: 'x'")]
    )
    await insert_span(
        e,
        cid,
        "trainer.allocated",
        "error",
        msg="gave up after 5 attempts: KeyError: 'x'",
        **{"hoptrace.dlq.topic": dlq},
    )
    d = await api.diagnose(cid)
    assert (d.stopped_at, d.cause) == ("trainer.allocated", "processing_error")
    got = d.facts.kafka["trainer.allocated"].dlq
    assert (got.partition, got.offset) == (p, o)
    assert "KeyError" in got.reason
    assert any(dlq in line for line in d.evidence)


async def test_marked_without_effect_from_real_rows(env) -> None:
    e = env
    await topics(e, e.spec.topics)
    cid = f"pay-{uuid.uuid4().hex[:8]}"
    await emitted_through(e, cid, "trainer.allocated")
    await row(e, "DELETE FROM trainer_allocations WHERE correlation_id = $1", cid)
    await row(
        e,
        "INSERT INTO processed_events (event_id, event_type, correlation_id, source) VALUES ($1,$2,$3,$4)",
        f"evt-{cid}",
        "PURCHASE_CREATED",
        cid,
        "trainer.allocated",
    )
    d = await api.diagnose(cid)
    assert (d.stopped_at, d.cause) == ("trainer.allocated", "marked_without_effect"), d.evidence
    assert d.facts.effects["trainer.allocated"] is False
    assert [p.event_id for p in d.facts.processed] == [f"evt-{cid}"]


async def test_kafka_unreachable_is_missing_evidence_not_a_guess(env, monkeypatch) -> None:
    e = env
    cid = f"pay-{uuid.uuid4().hex[:8]}"
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    await insert_span(
        e,
        cid,
        "payment.confirmed",
        at=long_ago,
        **{"hoptrace.emit.topic": "x", "hoptrace.emit.partition": 0, "hoptrace.emit.offset": 0},
    )
    await effect_row(e, "payments", cid)
    monkeypatch.setenv("HOPTRACE_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    get_settings.cache_clear()
    from hoptrace.collector.evidence import EvidenceSources, gather

    async with EvidenceSources(get_settings(), timeout=1.0) as src:
        ev = await gather(cid, e.spec, src)
    assert "kafka" in ev.missing
    from hoptrace.collector.diagnosis import diagnose

    d = diagnose(e.spec, ev, datetime.now(UTC))
    assert (d.stopped_at, d.cause) == ("purchase.created", "missing_evidence")


async def test_cli_exit_codes_for_malformed_and_unknown_ids(env) -> None:
    bad = cli(env, "trace", "not a valid id; drop table")
    assert bad.returncode == 2 and "not a valid correlation id" in bad.stderr
    long = cli(env, "trace", "x" * 129)
    assert long.returncode == 2
    unknown = cli(env, "trace", "pay-does-not-exist")
    assert unknown.returncode == 2 and "no payment with id 'pay-does-not-exist'" in unknown.stderr


async def test_cli_exit_1_when_the_span_store_cannot_be_read(env) -> None:
    e = env
    e.env = {**e.env, "HOPTRACE_DATABASE_URL": "postgresql://x:y@127.0.0.1:1/none"}
    out = cli(e, "trace", "pay-1")
    assert out.returncode == 1
    assert "the span store could not be read" in out.stderr
