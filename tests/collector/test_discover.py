"""`hoptrace spec discover`: a spec proposed from stored spans.

The pure core on real spans (fixtures): hoptrace's own services (the reference pipeline, stored
by the collector), the Node kafkajs worker (no group attribute, statements only), the Java agent
(default and stable semconv), chained and fanned out; every proposal is valid TOML that
``load_spec`` accepts (once a missing group is filled in). Then the command on the real stack:
the reference services run a few payments through a real collector, and `spec discover`, run
with the read-only role, proposes the shipped spec's steps, topics and groups."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from hoptrace.cli import app
from hoptrace.collector.discover import MARGIN, Proposal, discover
from hoptrace.collector.discover_runs import written_tables
from hoptrace.collector.discover_toml import render
from hoptrace.collector.records import SpanRecord
from hoptrace.contract import PipelineSpec, SpecError, load_spec, parse_spec
from tests.support import (
    REFERENCE_SPEC,
    create_database,
    delete_topics,
    drop_database,
    free_port,
    isolated_spec,
    readonly_url,
    unique,
)
from tests.workers.harness import HOPTRACE, Services, service_env

from .fixtures.spans import T0, hex_id, interop, producer, send_span, store, stored
from .fixtures.stack import start_collector, wait_step_spans

# ------------------------------------------------------------------------------------ helpers


def proposal(spans: list[SpanRecord]) -> tuple[Proposal, str]:
    p = discover(spans)
    assert p is not None
    return p, render(p, ["test"])


def loads(text: str, tmp_path: Path) -> PipelineSpec:
    path = tmp_path / f"{unique('proposed-')}.toml"
    path.write_text(text)
    tomllib.loads(text)
    return load_spec(path)


def shape(spec: PipelineSpec) -> list[tuple[Any, ...]]:
    return [(s.id, s.service, s.consumes, s.group, s.emits, s.after) for s in spec.steps]


# ------------------------------------------------------------------------------------ hoptrace


def test_hoptrace_s_own_spans_propose_the_shipped_spec(tmp_path: Path) -> None:
    p, text = proposal(stored("discover-hoptrace-spans.json"))
    spec = loads(text, tmp_path)
    shipped = load_spec(REFERENCE_SPEC)
    assert shape(spec) == shape(shipped)
    for got, want in zip(spec.steps, shipped.steps, strict=True):
        assert (got.table, got.event_type, got.calls) == (want.table, want.event_type, want.calls)
    assert spec.name == shipped.name
    assert spec.correlation.baggage and not spec.correlation.message_key
    # deadlines: observed p99 x3 rounded up, at least 1s (the runs took tens of ms)
    assert {s.deadline for s in spec.steps} == {timedelta(seconds=1)}
    assert "after = " not in text  # a linear pipeline: every default is right
    assert 'id = "payment.confirmed"' in text and "its spans' hoptrace.step" in text
    assert "also written: payment_outbox (3)" in text  # the runner-up, for the user to judge
    assert "x3, rounded up, at least 1s" in text and p.remarks == []


# ------------------------------------------------------------------------------------ Node


def node_pipeline(payments: int = 3, *, variant: str = "key") -> list[SpanRecord]:
    spans: list[SpanRecord] = []
    for i in range(payments):
        cid = str(uuid.uuid4())
        up = producer("checkout-api", "paid", cid, T0 + timedelta(seconds=i), baggage=False)
        spans += [up, *interop(f"node-{variant}", up, cid, topic_in="paid", topic_out="purchased")]
    return spans


def test_node_kafkajs_worker_without_group_attribute(tmp_path: Path) -> None:
    p, text = proposal(node_pipeline())
    assert [(s.id, s.service, s.consumes, s.emits) for s in p.steps] == [
        ("checkout-api", "checkout-api", None, "paid"),
        ("node-purchase-worker", "node-purchase-worker", "paid", "purchased"),
    ]
    node = p.steps[1]
    # the effect row, parsed from db.query.text; its processed marks are the runner-up
    assert node.table == "student_course_purchases"
    assert "also written: node_processed (3)" in node.notes["table"]
    # kafkajs names no group: a placeholder the user must fill, and a note
    assert node.group is None
    assert re.search(r'^# group = "\?"\s+# not in its spans', text, re.M)
    assert any("do not name the consumer group" in r for r in p.remarks)
    # no baggage on these spans: the message key carries the payment id
    assert (p.baggage, p.message_key) == (False, True)
    tomllib.loads(text)  # valid TOML ...
    with pytest.raises(SpecError, match="'group'"):  # ... that refuses to load until filled
        loads(text, tmp_path)
    spec = loads(text.replace('# group = "?"', 'group = "purchases"  #'), tmp_path)
    assert shape(spec) == [
        ("checkout-api", "checkout-api", None, None, "paid", ()),
        (
            "node-purchase-worker",
            "node-purchase-worker",
            "paid",
            "purchases",
            "purchased",
            ("checkout-api",),
        ),
    ]
    assert spec.correlation.message_key and not spec.correlation.baggage


def test_node_with_baggage_proposes_the_baggage_carrier() -> None:
    p, _ = proposal(node_pipeline(variant="baggage"))
    assert (p.baggage, p.message_key) == (True, False)
    assert p.baggage_note == "hoptrace.correlation_id on 3/6 runs"


# ------------------------------------------------------------------------------------ Java


@pytest.mark.parametrize("semconv", ["default", "stable"])
def test_java_agent_consumer(semconv: str, tmp_path: Path) -> None:
    spans: list[SpanRecord] = []
    for i in range(4):
        cid = str(uuid.uuid4())
        up = producer("allocator", "allocated", cid, T0 + timedelta(seconds=i), baggage=True)
        spans += [up, *interop(f"java-{semconv}", up, cid, topic_in="allocated", group="sessions")]
    p, text = proposal(spans)
    spec = loads(text, tmp_path)
    assert shape(spec) == [
        ("allocator", "allocator", None, None, "allocated", ()),
        (
            "java-session-worker",
            "java-session-worker",
            "allocated",
            "sessions",
            None,
            ("allocator",),
        ),
    ]
    # db.sql.table (default) or the statement / query summary (stable)
    assert spec.steps[1].table == "tutoring_sessions"
    assert "also written: java_handled (4)" in p.steps[1].notes["table"]
    assert spec.correlation.baggage and not spec.correlation.message_key
    assert p.steps[1].notes["group"] == "on 4/4 runs"


def test_node_then_java_in_one_trace_are_ordered_by_their_topics(tmp_path: Path) -> None:
    spans: list[SpanRecord] = []
    for i in range(3):
        cid = str(uuid.uuid4())
        up = producer("checkout-api", "paid", cid, T0 + timedelta(seconds=i), baggage=False)
        node = interop("node-key", up, cid, topic_in="paid", topic_out="purchased")
        java = interop("java-default", send_span(node), cid, topic_in="purchased", group="sessions")
        spans += [*reversed(java), up, *node]  # storage order says nothing
    p, text = proposal(spans)
    assert [s.id for s in p.steps] == [
        "checkout-api",
        "node-purchase-worker",
        "java-session-worker",
    ]
    assert [s.after for s in p.steps] == [(), (), ()]  # each after the one listed before it
    spec = loads(text.replace('# group = "?"', 'group = "purchases"  #'), tmp_path)
    assert spec.is_linear and [s.consumes for s in spec.steps] == [None, "paid", "purchased"]
    # the Java run is paired with the Node run above it in the trace: a measured deadline
    assert "after node-purchase-worker" in p.steps[2].notes["deadline"]


# ------------------------------------------------------------------------------------ fan-out


def test_fan_out_one_topic_two_groups(tmp_path: Path) -> None:
    """checkout-api -> paid -> {node: purchases -> purchased -> sessions (Java), mailer (Java)}."""
    spans: list[SpanRecord] = []
    for i in range(3):
        cid = str(uuid.uuid4())
        up = producer("checkout-api", "paid", cid, T0 + timedelta(seconds=i), baggage=True)
        mailer = interop(
            "java-stable", up, cid, topic_in="paid", group="mailer", service="mailer", lag_ms=1
        )
        node = interop("node-baggage", up, cid, topic_in="paid", topic_out="purchased", lag_ms=3)
        sessions = interop("java-default", send_span(node), cid, topic_in="purchased", group="s")
        spans += [up, *mailer, *node, *sessions]
    p, text = proposal(spans)
    text = text.replace('# group = "?"', 'group = "purchases"  #')
    spec = loads(text, tmp_path)
    # depth first from the first step; `after` only where the previous step is not the parent
    assert [(s.id, s.after) for s in spec.steps] == [
        ("checkout-api", ()),
        ("mailer", ("checkout-api",)),
        ("node-purchase-worker", ("checkout-api",)),
        ("java-session-worker", ("node-purchase-worker",)),
    ]
    assert [s.id for s in spec.consumers_of("paid")] == ["mailer", "node-purchase-worker"]
    assert [s.id for s in spec.leaves] == ["mailer", "java-session-worker"]
    assert text.count("after = ") == 1  # the mailer's is the default (the step before it)
    assert 'after = ["checkout-api"]' in text


# ------------------------------------------------------------------------------------ deadlines


def test_deadline_is_p99_times_the_margin_rounded_up(tmp_path: Path) -> None:
    """100 pairs, 10..1000 ms apart: p99 990 ms x3 = 2.97 s -> 3s."""
    spans: list[SpanRecord] = []
    for i in range(100):
        cid = str(uuid.uuid4())
        up = producer("orders", "placed", cid, T0 + timedelta(seconds=i), baggage=True)
        run, *below = interop("java-default", up, cid, topic_in="placed", group="g")
        done = up.end_time + timedelta(milliseconds=10 * (i + 1))
        spans += [up, dataclasses.replace(run, end_time=done), *below]
    p, text = proposal(spans)
    assert MARGIN == 3
    assert p.steps[1].deadline == "3s"
    assert (
        "p99 990 ms of 100 runs (done after orders) x3, rounded up" in p.steps[1].notes["deadline"]
    )
    assert loads(text, tmp_path).steps[1].deadline == timedelta(seconds=3)


# ------------------------------------------------------------------------------------ edges


def test_a_topic_nobody_was_seen_producing_gets_a_placeholder_first_step(tmp_path: Path) -> None:
    spans: list[SpanRecord] = []
    for i in range(2):
        cid = str(uuid.uuid4())
        unseen = producer("legacy", "orders v1", cid, T0 + timedelta(seconds=i), baggage=True)
        spans += interop("java-default", unseen, cid, topic_in="orders", group="g")
    p, text = proposal(spans)
    spec = loads(text, tmp_path)
    assert [(s.id, s.service, s.emits, s.consumes) for s in spec.steps] == [
        ("orders.producer", "?", "orders", None),
        ("java-session-worker", "java-session-worker", None, "orders"),
    ]
    assert "nobody was seen producing orders" in text


def test_an_unseen_upstream_keeps_the_bigger_pipeline(tmp_path: Path) -> None:
    """The first producer does not export spans; an unrelated producer does: the pipeline of
    two steps gets a placeholder first step, the lone producer is commented out."""
    spans: list[SpanRecord] = []
    for i in range(2):
        cid = str(uuid.uuid4())
        unseen = producer("legacy", "paid", cid, T0 + timedelta(seconds=i), baggage=True)
        node = interop("node-baggage", unseen, cid, topic_in="paid", topic_out="purchased")
        java = interop("java-default", send_span(node), cid, topic_in="purchased", group="g")
        billing = producer("billing", "invoices", cid, T0 - timedelta(seconds=1), baggage=True)
        spans += [*node, *java, billing]
    p, text = proposal(spans)
    assert [(s.id, s.enabled) for s in p.steps] == [
        ("paid.producer", True),
        ("node-purchase-worker", True),
        ("java-session-worker", True),
        ("billing", False),
    ]
    spec = loads(text.replace('# group = "?"', 'group = "purchases"  #'), tmp_path)
    assert [s.consumes for s in spec.steps] == [None, "paid", "purchased"]


def test_a_cycle_nobody_produces_into_is_entered_at_its_first_step(tmp_path: Path) -> None:
    spans: list[SpanRecord] = []
    for i in range(2):
        cid = str(uuid.uuid4())
        unseen = producer("outside", "x", cid, T0 + timedelta(seconds=i), baggage=True)
        a = interop("node-baggage", unseen, cid, topic_in="x", topic_out="y", service="a")
        spans += [
            *a,
            *interop("node-baggage", send_span(a), cid, topic_in="y", topic_out="x", service="b"),
        ]
    p, text = proposal(spans)
    spec = loads(text.replace('# group = "?"', 'group = "g"  #'), tmp_path)
    assert [(s.id, s.consumes, s.emits) for s in spec.steps] == [
        ("x.producer", None, "x"),
        ("a", "x", "y"),
        ("b", "y", "x"),
    ]


def test_a_second_pipeline_is_proposed_commented_out(tmp_path: Path) -> None:
    spans = node_pipeline(2)
    for i in range(1):
        cid = str(uuid.uuid4())
        up = producer("billing", "invoices", cid, T0 + timedelta(seconds=i), baggage=True)
        spans += [up, *interop("java-default", up, cid, topic_in="invoices", group="g")]
    p, text = proposal(spans)
    assert [(s.id, s.enabled) for s in p.steps] == [
        ("checkout-api", True),
        ("node-purchase-worker", True),
        ("billing", False),
        ("java-session-worker", False),
    ]
    spec = loads(text.replace('# group = "?"', 'group = "purchases"  #'), tmp_path)
    assert [s.id for s in spec.steps] == ["checkout-api", "node-purchase-worker"]
    assert '# id = "billing"' in text and any("commented out" in r for r in p.remarks)


def test_step_ids_are_readable_unique_and_valid(tmp_path: Path) -> None:
    """One service consuming two topics is two steps; odd service names become valid ids."""
    spans: list[SpanRecord] = []
    for i in range(2):
        cid = str(uuid.uuid4())
        up = producer("Checkout API (eu)", "a", cid, T0 + timedelta(seconds=i), baggage=True)
        first = interop("node-baggage", up, cid, topic_in="a", topic_out="b", service="Hub")
        second = interop(
            "java-default", send_span(first), cid, topic_in="b", group="g2", service="Hub"
        )
        spans += [up, *first, *second]
    p, text = proposal(spans)
    assert [s.id for s in p.steps] == ["checkout-api-eu", "hub.a", "hub.b"]
    spec = loads(text.replace('# group = "?"', 'group = "g1"  #'), tmp_path)
    assert [s.service for s in spec.steps] == ["Checkout API (eu)", "Hub", "Hub"]


def test_nothing_to_propose_without_a_messaging_or_step_span() -> None:
    http = SpanRecord(
        trace_id=hex_id(16), span_id=hex_id(8), name="GET /", service="web", kind=2, start_time=T0
    )
    assert discover([http]) is None
    assert discover([]) is None


@pytest.mark.parametrize(
    ("attributes", "tables"),
    [
        ({"db.sql.table": "t", "db.operation": "INSERT"}, ["t"]),
        ({"db.sql.table": "t", "db.operation": "SELECT"}, []),
        ({"db.collection.name": "orders", "db.operation.name": "insertMany"}, ["orders"]),
        ({"db.collection.name": "orders", "db.operation.name": "find"}, []),
        ({"db.query.summary": "UPDATE tutoring_sessions"}, ["tutoring_sessions"]),
        (
            {
                "db.query.text": "insert into s.t (a) values ($1) on conflict (a) do update set a = 1"
            },
            ["s.t"],
        ),
        ({"db.statement": "SELECT * FROM t WHERE id = $1 FOR UPDATE SKIP LOCKED"}, []),
        ({"db.statement": "SELECT 1 FROM t FOR NO KEY UPDATE"}, []),
        ({"db.statement": 'UPDATE ONLY "Orders" SET x = 1'}, ["Orders"]),
        (
            {"db.statement": "MERGE INTO stock USING x ON true WHEN MATCHED THEN UPDATE SET n = 1"},
            ["stock"],
        ),
        ({"db.statement": "SELECT 'INSERT INTO nope' FROM t"}, []),
        ({"db.statement": "BEGIN"}, []),
    ],
)
def test_written_tables(attributes: dict[str, Any], tables: list[str]) -> None:
    span = SpanRecord(
        trace_id="t",
        span_id="s",
        name="q",
        service="svc",
        kind=3,
        start_time=T0,
        attributes={"db.system": "postgresql", **attributes},
    )
    assert written_tables(span) == tables


def test_the_proposal_parses_back_to_what_it_says(tmp_path: Path) -> None:
    """Strings with quotes, backslashes and control characters stay valid TOML."""
    spans: list[SpanRecord] = []
    cid = str(uuid.uuid4())
    up = producer('we"ird\\svc\x7f', "t1", cid, T0, baggage=True)
    spans += [up, *interop("java-default", up, cid, topic_in="t1", group='g"1\n')]
    _, text = proposal(spans)
    spec = parse_spec(tomllib.loads(text))
    assert spec.steps[0].service == 'we"ird\\svc\x7f'
    assert spec.steps[1].group == 'g"1\n'


# ------------------------------------------------------------------------------------ command


def test_bad_since_or_limit_is_exit_2() -> None:
    res = CliRunner().invoke(app, ["spec", "discover", "--since", "an hour"])
    assert res.exit_code == 2 and "--since: bad duration" in res.output
    res = CliRunner().invoke(app, ["spec", "discover", "--limit", "0"])
    assert res.exit_code == 2 and "--limit must be at least 1" in res.output


@pytest.mark.stack
def test_nothing_stored_is_exit_1(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoptrace.settings import get_settings

    monkeypatch.setenv("HOPTRACE_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["spec", "discover"])
        assert res.exit_code == 1 and "no span store" in res.output
        subprocess.run([HOPTRACE, "migrate"], env={**os.environ}, check=True, capture_output=True)
        res = CliRunner().invoke(app, ["spec", "discover", "--since", "5m"])
        assert res.exit_code == 1, res.output
        assert "no pipeline step found" in res.output and "looked at 0 spans" in res.output
    finally:
        get_settings.cache_clear()


@pytest.mark.stack
def test_the_command_reads_at_most_limit_spans_per_query(
    db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from hoptrace.collector.discover_cli import Read, read
    from hoptrace.settings import get_settings

    spans = stored("discover-hoptrace-spans.json")
    asyncio.run(store(db_url, spans))

    async def reads() -> list[Read]:
        conn = await asyncpg.connect(db_url)
        try:
            return [
                await read(conn, timedelta(hours=1), 10),
                await read(conn, timedelta(hours=1), 100_000),
                await read(conn, timedelta(seconds=1), 100_000),
            ]
        finally:
            await conn.close()

    small, whole, old = asyncio.run(reads())
    assert small.looked == 10 and len(small.rows) <= 10
    assert whole.looked == len(spans) and whole.traces == 3  # the three payments' traces
    assert {r["span_id"] for r in whole.rows} < {s.span_id for s in spans}  # not the noise
    assert old.looked == 0 and old.rows == []  # --since: older spans are not looked at
    readonly = readonly_url(db_url)
    monkeypatch.setenv("HOPTRACE_DATABASE_URL", readonly)
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["spec", "discover", "--since", "30m"])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert f"looked at {len(spans)} spans of the last 30m" in text
    assert shape(loads(text, tmp_path)) == shape(load_spec(REFERENCE_SPEC))


# ------------------------------------------------------------------------------------ real stack


@pytest.fixture
def reference_run(
    admin_db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[dict[str, str], PipelineSpec, list[str]]]:
    """The reference services and a collector on this test's database and topics; three
    payments made and every step span of them stored."""
    name = unique("hoptrace_s_")
    db_url = asyncio.run(create_database(admin_db_url, name))
    spec_path = isolated_spec(tmp_path, unique(""))
    spec = load_spec(spec_path)
    http = free_port()
    env = service_env(db_url, kafka_bootstrap, spec_path, None)
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.update(
        {
            "HOPTRACE_OTLP_GRPC_PORT": str(free_port()),
            "HOPTRACE_OTLP_HTTP_PORT": str(http),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{http}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    res = subprocess.run([HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    collector = start_collector(env, tmp_path)
    services = Services(env, tmp_path)
    try:
        services.start_all()
        cids = []
        for _ in range(3):
            out = subprocess.run(
                [HOPTRACE, "pay"], env=env, capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, out.stderr
            cids.append(out.stdout.strip().splitlines()[-1])
        asyncio.run(wait_step_spans(db_url, cids, [s.id for s in spec.steps]))
        yield env, spec, cids
    finally:
        services.stop_all()
        collector.terminate()
        try:
            collector.wait(20)
        except subprocess.TimeoutExpired:
            collector.kill()
        asyncio.run(delete_topics(kafka_bootstrap, spec.topics))
        asyncio.run(drop_database(admin_db_url, name))


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_spec_discover_on_the_reference_pipeline(
    reference_run: tuple[dict[str, str], PipelineSpec, list[str]], tmp_path: Path
) -> None:
    env, spec, _ = reference_run
    readonly = readonly_url(env["HOPTRACE_DATABASE_URL"])
    assert readonly.startswith("postgresql://hoptrace_ro:")  # SELECT only
    res = subprocess.run(
        [HOPTRACE, "spec", "discover", "--since", "10m"],
        env={**env, "HOPTRACE_DATABASE_URL": readonly},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    proposed = loads(res.stdout, tmp_path)
    # the shipped spec's steps, in its order, with this run's topics and groups
    assert [(s.id, s.service, s.consumes, s.group, s.emits) for s in proposed.steps] == [
        (s.id, s.service, s.consumes, s.group, s.emits) for s in spec.steps
    ]
    assert [s.after for s in proposed.steps] == [s.after for s in spec.steps]
    assert [s.table for s in proposed.steps] == [s.table for s in spec.steps]
    assert "hoptrace: proposed 4 steps of pipeline 'payments'" in res.stderr
    assert re.search(r"looked at \d+ spans of the last 10m", res.stderr)
