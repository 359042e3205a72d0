"""A dashboard lookup is one API call: the Kafka and database facts beside the diagnosis come from
the evidence it was decided on (``Diagnosis.facts``), never from a second evidence pass."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from hoptrace.collector import api
from hoptrace.collector.diagnosis import diagnose
from hoptrace.collector.records import Evidence, KafkaFacts, ProcessedEvent, RecordRef, SpanRecord
from hoptrace.contract import load_spec
from hoptrace.dashboard.api_source import ApiSource
from hoptrace.settings import PROJECT_ROOT

SPEC = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def evidence(cid: str) -> Evidence:
    first = SPEC.steps[0]
    second = SPEC.steps[1]
    span = SpanRecord(
        trace_id="c" * 32,
        span_id="s1",
        name=first.id,
        service=first.service,
        start_time=NOW,
        end_time=NOW,
        step=first.id,
        outcome="ok",
        attributes={"hoptrace.emit.topic": first.emits, "hoptrace.emit.partition": 2},
    )
    return Evidence(
        cid,
        spans=(span,),
        kafka={
            second.id: KafkaFacts(
                topic=second.consumes,
                group=second.group,
                topic_exists=True,
                group_exists=False,
                group_members=0,
                record=RecordRef(str(first.emits), 2, 41),
            )
        },
        processed=(ProcessedEvent("e-1", "X", first.service, NOW),),
        effects={first.id: True},
    )


def test_the_lookup_page_s_facts_come_from_the_diagnosis(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def one_lookup(cid: str, **_: Any) -> api.Diagnosis:
        calls.append(cid)
        return diagnose(SPEC, evidence(cid), NOW)

    async def second_pass(*_: Any, **__: Any) -> Evidence:
        raise AssertionError("the dashboard gathered the evidence a second time")

    monkeypatch.setattr(api, "diagnose", one_lookup)
    monkeypatch.setattr(api, "gather_evidence", second_pass)
    source = ApiSource("postgresql://unused", "http://jaeger.test")
    monkeypatch.setattr(source, "pool", lambda: None)

    looked = source.diagnose("pay-1")

    assert calls == ["pay-1"]
    assert looked.cause == "no_consumer" and looked.stopped_at == SPEC.steps[1].id
    [kafka] = looked.kafka_facts
    assert kafka["step"] == SPEC.steps[1].id and kafka["produced offset"] == 41
    mark = f"X processed by {SPEC.steps[0].service} at "
    assert any(
        r["what"] == "processed_events" and r["fact"].startswith(mark) for r in looked.db_facts
    )
    assert [s.span_id for s in looked.spans] == ["s1"]
