"""The collector knows a pipeline only from its spec: a pipeline whose services, event types,
downstream service, processed table, effect column and group-changing fault share no name with the
reference pipeline is diagnosed, read and checked the same way."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from hoptrace.collector.db_facts import database_facts, effect_sql, processed_sql
from hoptrace.collector.deploy_check import check_deploy
from hoptrace.collector.diagnosis import Evidence, KafkaFacts, ProcessedEvent, SpanRecord, diagnose
from hoptrace.collector.evidence import EvidenceSources
from hoptrace.contract import parse_spec
from hoptrace.settings import Settings

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CID = "ord-1"

SPEC = parse_spec(
    {
        "pipeline": {
            "name": "orders",
            "correlation_key": "order_id",
            "processed": {
                "table": "inbox",
                "event_id_column": "message_id",
                "event_type_column": "kind",
                "correlation_column": "order_ref",
                "source_column": "handler",
                "processed_at_column": "handled_at",
            },
        },
        "steps": [
            {"id": "order.placed", "service": "shop", "emits": "orders", "deadline": "5s"},
            {
                "id": "stock.reserved",
                "service": "stock-keeper",
                "consumes": "orders",
                "group": "stock",
                "event_type": "ORDER_PLACED_V1",
                "calls": "warehouse-api",
                "emits": "reservations",
                "table": "reservations",
                "correlation_column": "order_ref",
                "deadline": "10s",
            },
            {
                "id": "parcel.sent",
                "service": "shipper",
                "consumes": "reservations",
                "group": "ship",
                "deadline": "10s",
            },
        ],
    }
)


def span(step_id: str, outcome: str = "ok", error: str | None = None) -> SpanRecord:
    step = SPEC.step(step_id)
    start = T0 + timedelta(seconds=SPEC.index(step_id))
    attrs: dict = {"hoptrace.step": step_id, "hoptrace.step.outcome": outcome}
    if step.emits and outcome == "ok":
        attrs |= {"hoptrace.emit.topic": step.emits, "hoptrace.emit.partition": 0}
        attrs["hoptrace.emit.offset"] = 7
    return SpanRecord(
        trace_id="b" * 32,
        span_id=f"{step_id}-{outcome}",
        name=step_id,
        service=step.service,
        start_time=start,
        end_time=start + timedelta(milliseconds=50),
        status_code=2 if outcome == "error" else 1,
        status_message=error,
        step=step_id,
        outcome=outcome,
        attributes=attrs,
    )


def kafka_ok() -> dict[str, KafkaFacts]:
    return {
        s.id: KafkaFacts(
            topic=s.consumes,
            group=s.group,
            topic_exists=True,
            group_exists=True,
            group_members=1,
            committed_offset=8,
            end_offset=8,
        )
        for s in SPEC.steps
        if s.consumes
    }


def test_a_failure_naming_the_step_s_downstream_service_is_a_downstream_error() -> None:
    spans = (span("order.placed"), span("stock.reserved", "error", "Warehouse-API refused: 409"))
    d = diagnose(SPEC, Evidence(CID, spans=spans, kafka=kafka_ok()), T0 + timedelta(seconds=3))
    assert (d.stopped_at, d.cause) == ("stock.reserved", "downstream_error")
    other = (span("order.placed"), span("stock.reserved", "error", "admin-service refused"))
    d = diagnose(SPEC, Evidence(CID, spans=other, kafka=kafka_ok()), T0 + timedelta(seconds=3))
    assert d.cause == "processing_error"  # the reference pipeline's service means nothing here


def test_processed_marks_match_by_the_step_s_event_type_and_name_the_processed_table() -> None:
    mark = ProcessedEvent("m-1", "ORDER_PLACED_V1", "legacy-consumer", T0, table="inbox")
    spans = (span("order.placed"),)
    ev = Evidence(
        CID, spans=spans, kafka=kafka_ok(), processed=(mark,), effects={"stock.reserved": True}
    )
    d = diagnose(SPEC, ev, T0 + timedelta(minutes=5))
    assert (d.stopped_at, d.cause) == ("stock.reserved", "consumed_without_trace"), d.evidence
    assert any(line.startswith("inbox: m-1 marked by legacy-consumer") for line in d.evidence)
    elsewhere = ProcessedEvent("m-1", "ORDER_PLACED_V1", "legacy-consumer", T0, table="outbox")
    ev = Evidence(CID, spans=spans, kafka=kafka_ok(), processed=(elsewhere,))
    d = diagnose(SPEC, ev, T0 + timedelta(minutes=5))
    assert d.cause != "consumed_without_trace"  # a mark in another table is not this step's


def test_queries_name_the_spec_s_tables_and_columns() -> None:
    assert processed_sql(SPEC.processed) == (
        "SELECT message_id, kind, handler, handled_at FROM inbox WHERE order_ref = $1 "
        "ORDER BY handled_at"
    )
    assert effect_sql("reservations", "order_ref") == (
        'SELECT EXISTS (SELECT 1 FROM "reservations" WHERE order_ref = $1)'
    )


@pytest.mark.stack
async def test_database_facts_read_the_spec_s_processed_table_and_effect_column(
    db_url: str,
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "CREATE TABLE inbox (message_id text, kind text, order_ref text, handler text, "
            "handled_at timestamptz);"
            "CREATE TABLE reservations (id serial, order_ref text)"
        )
        await conn.execute(
            "INSERT INTO inbox VALUES ('m-2', 'ORDER_PLACED_V1', $1, 'stock', $2),"
            "('m-1', 'ORDER_PLACED_V1', $1, 'stock', $3), ('m-9', 'X', 'other', 'stock', $3)",
            CID,
            T0 + timedelta(seconds=2),
            T0,
        )
        await conn.execute("INSERT INTO reservations (order_ref) VALUES ($1)", CID)
    finally:
        await conn.close()
    missing: dict[str, str] = {}
    async with EvidenceSources(Settings(database_url=db_url)) as sources:
        processed, effects = await database_facts(sources, SPEC, CID, missing)
    assert missing == {}
    assert effects == {"stock.reserved": True}
    assert [(p.event_id, p.source, p.table) for p in processed] == [
        ("m-1", "stock", "inbox"),
        ("m-2", "stock", "inbox"),
    ]


COMPOSE = """
services:
  init:
    command: ["hoptrace topics ensure"]
  shop:
    command: ["worker", "shop"]
  stock-keeper:
    command: ["worker", "stock-keeper", "--fault", "legacy-consumer"]
  shipper:
    command: ["worker", "shipper"]
"""


def test_the_deploy_check_takes_group_changing_faults_from_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "compose.yml"
    path.write_text(textwrap.dedent(COMPOSE))
    assert check_deploy(path, SPEC).ok  # a fault switch is nothing special by itself
    report = check_deploy(path, SPEC, {"legacy-consumer": "{group}-legacy"})
    assert report.problems == [
        "step stock.reserved: service stock-keeper runs with fault legacy-consumer "
        "(consumer group stock-legacy instead of stock)"
    ]
