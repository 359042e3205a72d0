"""Pipelines that are DAGs: one topic consumed by two groups (fan-out), a step after two others
(join). ``stopped_at`` stays the first step (spec order) that is not done; ``stopped_at_all``
names where every unfinished branch stopped, each with the status and cause its rules decide;
deadlines count from the last of a step's ``after`` steps; processed marks of one event by two
steps are each their own step's, read from the user's own tables."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import jsonschema
import pytest

from hoptrace.collector.db_facts import database_facts
from hoptrace.collector.diagnosis import (
    Evidence,
    KafkaFacts,
    ProcessedEvent,
    RecordRef,
    SpanRecord,
    diagnose,
)
from hoptrace.collector.evidence import EvidenceSources
from hoptrace.collector.render import render, to_dict
from hoptrace.contract import parse_spec
from hoptrace.settings import PROJECT_ROOT, Settings

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
CID = "ord-42"
SCHEMA = json.loads((PROJECT_ROOT / "docs" / "trace-json-schema.json").read_text())
INBOX = {
    "table": "stock_inbox",
    "event_id_column": "msg",
    "event_type_column": "kind",
    "correlation_column": "order_ref",
    "source_column": "handler",
    "processed_at_column": "at",
}

#: order.placed -> orders -> { stock.reserved -> reservations -> parcel.sent ; audit.logged },
#: and invoice.sent after both stock.reserved and audit.logged (a join).
SPEC = parse_spec(
    {
        "pipeline": {
            "name": "orders",
            "correlation_key": "order_id",
            "processed": {**INBOX, "table": "marks", "correlation_column": "order_ref"},
        },
        "steps": [
            {"id": "order.placed", "service": "shop", "emits": "orders", "deadline": "5s"},
            {
                "id": "stock.reserved",
                "service": "stock-keeper",
                "consumes": "orders",
                "group": "stock",
                "event_type": "ORDER_PLACED",
                "emits": "reservations",
                "table": "reservations",
                "correlation_column": "order_ref",
                "processed": INBOX,
                "deadline": "10s",
            },
            {
                "id": "audit.logged",
                "service": "auditor",
                "consumes": "orders",
                "group": "audit",
                "event_type": "ORDER_PLACED",
                "after": ["order.placed"],
                "table": "audit_log",
                "correlation_column": "order_ref",
                "deadline": "10s",
            },
            {
                "id": "parcel.sent",
                "service": "shipper",
                "consumes": "reservations",
                "group": "ship",
                "after": ["stock.reserved"],
                "deadline": "10s",
            },
            {
                "id": "invoice.sent",
                "service": "billing",
                "consumes": "reservations",
                "group": "billing",
                "after": ["stock.reserved", "audit.logged"],
                "deadline": "10s",
            },
        ],
    }
)
STEPS = [s.id for s in SPEC.steps]


def span(step_id: str, at: float, outcome: str = "ok") -> SpanRecord:
    step = SPEC.step(step_id)
    start = T0 + timedelta(seconds=at)
    attrs: dict = {"hoptrace.step": step_id, "hoptrace.step.outcome": outcome}
    if step.consumes:
        attrs |= {
            "messaging.destination.name": step.consumes,
            "messaging.destination.partition.id": "0",
            "messaging.kafka.offset": 3,
            "messaging.consumer.group.name": step.group,
        }
    if step.emits:
        attrs |= {"hoptrace.emit.topic": step.emits, "hoptrace.emit.partition": 0}
        attrs["hoptrace.emit.offset"] = 3
    return SpanRecord(
        trace_id="d" * 32,
        span_id=f"{step_id}-{at}",
        name=step_id,
        service=step.service,
        start_time=start,
        end_time=start + timedelta(milliseconds=100),
        status_code=2 if outcome == "error" else 1,
        step=step_id,
        outcome=outcome,
        attributes=attrs,
    )


def kafka(**overrides: dict) -> dict[str, KafkaFacts]:
    """Every group has a member; the record of each step is waiting (not consumed yet)."""
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
                record=RecordRef(step.consumes, 0, 3),
                committed_offset=3,
                end_offset=4,
                other_groups=(),
            )
            out[step.id] = replace(kf, **overrides.get(step.id, {}))
    return out


NO_AUDITOR = {"audit.logged": {"group_members": 0, "group_state": "Empty"}}


def evidence(spans: list[SpanRecord], **kw: object) -> Evidence:
    return Evidence(
        CID,
        spans=tuple(spans),
        kafka=kw.pop("kafka", None) or kafka(),
        processed=kw.pop("processed", ()),
        **kw,
    )


def statuses(d) -> dict[str, str]:
    return {s.id: s.status for s in d.steps}


# ------------------------------------------------------------------------------ stopped_at_all
def test_one_branch_completes_and_the_other_stalls() -> None:
    spans = [span("order.placed", 0), span("stock.reserved", 1), span("parcel.sent", 2)]
    d = diagnose(SPEC, evidence(spans, kafka=kafka(**NO_AUDITOR)), T0 + timedelta(minutes=5))
    assert (d.stopped_at, d.stopped_at_all) == ("audit.logged", ("audit.logged",))
    assert (d.cause, d.state) == ("no_consumer", "stalled")
    assert d.next_action == "start auditor"
    assert statuses(d) == {
        "order.placed": "done",
        "stock.reserved": "done",
        "audit.logged": "stalled",
        "parcel.sent": "done",
        "invoice.sent": "not_reached",  # it runs after audit.logged
    }


def test_every_unfinished_branch_is_named_with_its_own_cause() -> None:
    """order.placed and stock.reserved are done. Two branches are unfinished: audit.logged (no
    consumer, overdue) and parcel.sent (a member, within its deadline); invoice.sent waits
    behind audit.logged."""
    spans = [span("order.placed", 0), span("stock.reserved", 14)]
    now = T0 + timedelta(seconds=16)  # audit.logged: 16 s after order.placed, parcel.sent: 1.9 s
    d = diagnose(SPEC, evidence(spans, kafka=kafka(**NO_AUDITOR)), now)
    assert d.stopped_at == "audit.logged"  # the first step, in spec order, that is not done
    assert d.stopped_at_all == ("audit.logged", "parcel.sent")
    assert (d.cause, d.state) == ("no_consumer", "stalled")
    st = statuses(d)
    assert (st["audit.logged"], st["parcel.sent"], st["invoice.sent"]) == (
        "stalled",
        "pending",
        "not_reached",
    )
    parcel = d.step("parcel.sent").evidence
    assert "branch stopped here: in_progress" in parcel, parcel
    assert any(line.startswith("1.9s since stock.reserved (within deadline") for line in parcel)
    assert "next: wait for parcel.sent (deadline 10.0s)" in parcel
    # every output names both
    doc = to_dict(d)
    jsonschema.validate(doc, SCHEMA)
    assert doc["stopped_at_all"] == ["audit.logged", "parcel.sent"]
    text = render(d, "text")
    assert "branches stopped at: audit.logged, parcel.sent" in text
    assert "▶ ⏸ audit.logged" in text and "▷ … parcel.sent" in text
    assert "branch stopped here: in_progress" in text
    md = render(d, "markdown")
    assert "- **Branches stopped at:** `audit.logged`, `parcel.sent`" in md


def test_a_failed_branch_fails_the_correlation_even_when_the_first_one_waits() -> None:
    spans = [span("order.placed", 0), span("stock.reserved", 1, "error")]
    d = diagnose(SPEC, evidence(spans), T0 + timedelta(seconds=3))
    assert d.stopped_at_all == ("stock.reserved", "audit.logged")
    assert d.cause == "processing_error" and d.state == "failed"
    assert statuses(d)["audit.logged"] == "pending"
    assert "branch stopped here: in_progress" in d.step("audit.logged").evidence


def test_a_join_s_deadline_counts_from_the_last_of_its_after_steps() -> None:
    """invoice.sent runs after stock.reserved (done at 1 s) and audit.logged (done at 20 s): at
    25 s it is 5 s into its 10 s deadline, not 24 s."""
    spans = [
        span("order.placed", 0),
        span("stock.reserved", 1),
        span("parcel.sent", 2),
        span("audit.logged", 20),
    ]
    d = diagnose(SPEC, evidence(spans), T0 + timedelta(seconds=25))
    assert (d.stopped_at, d.cause) == ("invoice.sent", "in_progress"), d.evidence
    assert statuses(d)["invoice.sent"] == "pending"
    assert any("since audit.logged (within deadline 10.0s)" in line for line in d.evidence)
    late = diagnose(SPEC, evidence(spans), T0 + timedelta(seconds=31))
    assert (late.cause, late.step("invoice.sent").status) == ("consumer_lag", "stalled")


# ------------------------------------------------------------------------------ processed marks
def test_two_steps_marking_one_event_are_not_confused() -> None:
    """Both steps consume ORDER_PLACED and each marks it (under its own source, in its own
    table): audit.logged ran without a span; its mark is its own, stock.reserved's is not."""
    marks = (
        ProcessedEvent("evt-1", "ORDER_PLACED", "stock.reserved", T0, table="stock_inbox"),
        ProcessedEvent("evt-1", "ORDER_PLACED", "audit.logged", T0, table="marks"),
        ProcessedEvent("evt-1", "ORDER_PLACED", "legacy-consumer", T0, table="marks"),
    )
    spans = [span("order.placed", 0), span("stock.reserved", 1), span("parcel.sent", 2)]
    ev = evidence(spans, processed=marks, effects={"stock.reserved": True, "audit.logged": True})
    d = diagnose(SPEC, ev, T0 + timedelta(minutes=5))
    assert (d.stopped_at, d.cause) == ("audit.logged", "consumed_without_trace"), d.evidence
    assert any(line.startswith("marks: evt-1 marked by audit.logged") for line in d.evidence)
    stock = [x for x in d.step("stock.reserved").evidence if "evt-1" in x]
    audit = [x for x in d.step("audit.logged").evidence if "evt-1" in x]
    assert stock == [
        "stock_inbox: ORDER_PLACED evt-1 by stock.reserved at "
        + T0.isoformat(timespec="milliseconds")
    ]
    assert all("legacy-consumer" not in x and "by stock.reserved" not in x for x in audit)  # fmt: skip
    # the same marks with no effect rows: a mark by an unknown source and an event type two
    # steps consume is nobody's (it could be either)
    only_legacy = evidence(spans, processed=marks[2:])
    d = diagnose(SPEC, only_legacy, T0 + timedelta(minutes=5))
    assert d.cause != "consumed_without_trace"
    assert not any("legacy-consumer" in x for s in d.steps for x in s.evidence)


@pytest.mark.stack
async def test_marks_and_effects_are_read_from_the_user_s_own_tables(db_url: str) -> None:
    """Each step's processed table and effect column, as the spec names them: stock.reserved's
    inbox, the pipeline's ``marks`` for audit.logged, ``order_ref`` in the effect tables."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "CREATE TABLE stock_inbox (msg text, kind text, order_ref text, handler text, at timestamptz);"
            "CREATE TABLE marks (msg text, kind text, order_ref text, handler text, at timestamptz);"
            "CREATE TABLE reservations (id serial, order_ref text);"
            "CREATE TABLE audit_log (id serial, order_ref text)"
        )  # fmt: skip
        for table, source, at in (
            ("stock_inbox", "stock.reserved", T0 + timedelta(seconds=1)),
            ("marks", "audit.logged", T0 + timedelta(seconds=2)),
        ):
            await conn.execute(
                f"INSERT INTO {table} VALUES ('evt-1', 'ORDER_PLACED', $1, $2, $3),"  # noqa: S608
                " ('evt-9', 'ORDER_PLACED', 'another', $2, $3)",
                CID,
                source,
                at,
            )
        await conn.execute("INSERT INTO reservations (order_ref) VALUES ($1)", CID)
    finally:
        await conn.close()
    missing: dict[str, str] = {}
    async with EvidenceSources(Settings(database_url=db_url)) as sources:
        processed, effects = await database_facts(sources, SPEC, CID, missing)
    assert missing == {}
    assert effects == {"stock.reserved": True, "audit.logged": False}
    assert [(p.event_id, p.source, p.table) for p in processed] == [
        ("evt-1", "stock.reserved", "stock_inbox"),
        ("evt-1", "audit.logged", "marks"),
    ]
    spans = [span("order.placed", 0), span("stock.reserved", 1), span("parcel.sent", 2)]
    ev = evidence(spans, processed=processed, effects=effects)
    d = diagnose(SPEC, ev, T0 + timedelta(minutes=5))
    # audit.logged marked the event but wrote no audit_log row, and reported no span
    assert (d.stopped_at, d.cause) == ("audit.logged", "consumed_without_trace"), d.evidence
    assert "marks: evt-1 marked by audit.logged" in " ".join(d.evidence)
    assert "stock_inbox: ORDER_PLACED evt-1 by stock.reserved" in " ".join(
        d.step("stock.reserved").evidence
    )
