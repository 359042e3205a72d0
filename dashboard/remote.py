"""The read API's JSON back into what the pages show, for the HTTP source: a trace document
(``GET /api/v1/correlations/{id}?spans=true``) read like a diagnosis, its Kafka and database
facts rebuilt as the API's own ``Evidence`` (so the tables come out of the same
``frames.kafka_rows``/``db_rows`` as on the database path), stalls as ``StallRow``s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from hoptrace.collector.api import (
    SOURCE_DEAD_LETTERS,
    DlqRecord,
    Evidence,
    GroupMember,
    KafkaFacts,
    ProcessedEvent,
    RecordRef,
    StallRow,
)
from hoptrace.dashboard import frames

#: Trace document field names that are also contract words (spelled as keywords, as
#: ``render.to_dict`` does).
MISSING, KAFKA = dict(missing_evidence=1, kafka=1)


def _record(doc: Mapping[str, Any] | None) -> RecordRef | None:
    if not doc:
        return None
    return RecordRef(doc["topic"], doc.get("partition"), doc.get("offset"))


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def kafka_facts(doc: Mapping[str, Any], dlq_checked: bool) -> KafkaFacts:
    dlq = doc.get("dlq")
    others = doc.get("other_members")
    return KafkaFacts(
        topic=doc.get("topic"),
        group=doc.get("group"),
        topic_exists=doc.get("topic_exists"),
        group_exists=doc.get("group_exists"),
        group_state=doc.get("group_state"),
        group_members=doc.get("group_members"),
        record=_record(doc.get("record")),
        committed_offset=doc.get("committed_offset"),
        end_offset=doc.get("end_offset"),
        other_groups=tuple(doc["other_groups"]) if doc.get("other_groups") is not None else None,
        other_members=tuple(
            GroupMember(m["group"], m["client_id"], m["host"], tuple(m["partitions"]))
            for m in others
        )
        if others is not None
        else None,
        dlq=DlqRecord(dlq["topic"], dlq["partition"], dlq["offset"], dlq.get("reason"))
        if dlq
        else None,
        dlq_checked=bool(doc.get("dlq_checked", dlq_checked)) or bool(dlq),
    )


def evidence(doc: Mapping[str, Any], tables: Sequence[str]) -> Evidence:
    """The facts a trace document carries, as the API's ``Evidence`` (``tables``: the steps
    that have an effect table, from the pipeline spec)."""
    missing = dict(doc.get(MISSING) or {})
    steps = {s["id"]: s for s in doc.get("steps") or []}
    processed = doc.get("processed_events")
    return Evidence(
        doc["correlation_id"],
        kafka={
            sid: kafka_facts(s[KAFKA], SOURCE_DEAD_LETTERS not in missing)
            for sid, s in steps.items()
            if s.get(KAFKA)
        },
        processed=tuple(
            ProcessedEvent(p["event_id"], p["event_type"], p["source"], _time(p["processed_at"]))
            for p in processed
        )
        if processed is not None
        else None,
        effects={sid: steps[sid].get("effect_row") for sid in tables if sid in steps},
        missing=missing,
    )


class RemoteLooked:
    """A trace document read like a diagnosis (``lookup.show`` reads fields by name), with the
    Kafka and database fact rows and the spans, each with the step it is a run of."""

    def __init__(self, doc: Mapping[str, Any], tables: Sequence[str]) -> None:
        self.doc = dict(doc)
        facts = evidence(doc, tables)
        self.kafka_facts = frames.kafka_rows(facts)
        self.db_facts = frames.db_rows(facts)
        self.spans = list(doc.get("spans") or [])
        self.span_steps = None  # each span names its step

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["doc"][name]
        except KeyError:
            raise AttributeError(name) from None


def stall_rows(rows: Sequence[Mapping[str, Any]]) -> list[StallRow]:
    """``GET /api/v1/stalls`` rows as the store's ``StallRow``s."""
    return [
        StallRow(
            correlation_id=r["correlation_id"],
            pipeline=r.get("pipeline"),
            step=r.get("step"),
            last_step=r.get("last_step"),
            last_step_at=None,
            since=datetime.fromisoformat(r["since"]),
            overdue_by=timedelta(seconds=float(r["overdue_by_seconds"])),
            state=r["state"],
            error=r.get("last_error"),
        )
        for r in rows
    ]
