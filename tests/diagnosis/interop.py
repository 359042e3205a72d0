"""Spans from services hoptrace did not write, as the collector stores them: the captures of
``tests/interop`` (Node.js kafkajs + pg, the Java agent's default and stable spellings, each healthy
and with a failing database write; see ``interop/README.md``), copied into ``interop_spans/``, and
hoptrace's own step spans made by hand around them, placed in one pipeline.

A capture holds the service's spans of one record (plus its start-up's, in traces of their own):
its consumer span is a child of the upstream producer span named in ``upstream``. ``foreign()``
renames its topics, group, payment id and trace into a test's pipeline and times the spans
(captures keep durations only: spans end in the order they were exported)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hoptrace.collector.records import SpanRecord
from hoptrace.contract import PipelineSpec, parse_spec
from hoptrace.contract.conventions import SpanKind
from hoptrace.contract.matching import StepMatcher

CAPTURES = Path(__file__).parent / "interop_spans"
_STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}

#: The reference pipeline with purchase.created run by the Node worker and session.created by
#: the Java consumer (their service names as their captures report them); payment.confirmed and
#: trainer.allocated are hoptrace's. Correlation ids ride in baggage or in the message key.
MIXED: PipelineSpec = parse_spec(
    {
        "pipeline": {
            "name": "payments",
            "correlation_key": "payment_id",
            "correlation": {"baggage": True, "message_key": True},
        },
        "steps": [
            {
                "id": "payment.confirmed",
                "service": "payment-service",
                "emits": "purchase-confirmed",
                "deadline": "5s",
            },
            {
                "id": "purchase.created",
                "service": "node-purchase-worker",
                "consumes": "purchase-confirmed",
                "group": "purchase-worker",
                "emits": "purchase-created",
                "deadline": "30s",
            },
            {
                "id": "trainer.allocated",
                "service": "allocation-worker",
                "consumes": "purchase-created",
                "group": "allocation-worker",
                "calls": "admin-service",
                "emits": "trainer-allocated",
                "deadline": "30s",
            },
            {
                "id": "session.created",
                "service": "java-session-worker",
                "consumes": "trainer-allocated",
                "group": "session-worker",
                "deadline": "30s",
            },
        ],
    }
)


def capture(name: str) -> dict[str, Any]:
    """One capture file (``node-baggage``, ``java-default``, ``java-fail-db-write`` ...)."""
    return json.loads((CAPTURES / f"interop-{name}-spans.json").read_text())


def upstream_span_id(name: str) -> str:
    """The span id of the producer span the capture's consumer span is a child of."""
    return str(capture(name)["upstream"]["producer_span"]["span_id"])


def foreign(
    name: str,
    *,
    topics: dict[str, str],
    group: str | None,
    cid: str,
    trace: str,
    t0: datetime,
    spec: PipelineSpec = MIXED,
) -> list[SpanRecord]:
    """The capture's spans of its record, as stored: ``topics`` maps the capture's topic names
    (``in``, ``out``) to the pipeline's, its group becomes ``group``, its payment id ``cid``, its
    trace ``trace``; the spans end 10 ms apart from ``t0`` in export order. ``correlation_id`` is
    what the spec's carriers read (None when the span carries none)."""
    doc = capture(name)
    up = doc["upstream"]
    main = up["producer_span"]["trace_id"]
    sfx = str(doc["group"]).rsplit("-", 1)[-1]
    names = {f"interop-{k}-{sfx}": v for k, v in topics.items()}
    if group is not None:
        names[str(doc["group"])] = group
    names[str(up["payment_id"])] = cid
    matcher = StepMatcher(spec)

    def swap(value: Any) -> Any:
        if isinstance(value, str):
            for old, new in names.items():
                value = value.replace(old, new)
        return value

    out: list[SpanRecord] = []
    for i, raw in enumerate(doc["spans"]):
        if raw["trace_id"] != main:  # the service's start-up: a trace of its own, no payment
            continue
        attrs = {k: swap(v) for k, v in raw["attributes"].items()}
        end = t0 + timedelta(milliseconds=10 * (i + 1))
        start = end - timedelta(milliseconds=float(raw["duration_ms"]))
        resource = dict(raw["resource"])
        out.append(
            SpanRecord(
                trace_id=trace,
                span_id=raw["span_id"],
                parent_span_id=raw["parent_span_id"] or None,
                name=swap(raw["name"]),
                service=str(resource["service.name"]),
                kind=int(SpanKind[raw["kind"]]),
                start_time=start,
                end_time=end,
                status_code=_STATUS[raw["status"]["code"]],
                status_message=raw["status"]["message"] or None,
                attributes=attrs,
                events=[
                    {
                        "name": e["name"],
                        "attributes": {k: swap(v) for k, v in e["attributes"].items()},
                    }
                    for e in raw["events"]
                ],
                duration_us=int(float(raw["duration_ms"]) * 1000),
                correlation_id=matcher.correlation_id(attrs),
                resource=resource,
                scope=raw["scope"]["name"],
            )
        )
    return out


def own_step(
    spec: PipelineSpec,
    step_id: str,
    *,
    cid: str,
    trace: str,
    at: datetime,
    span_id: str,
    parent: str | None = None,
    outcome: str = "ok",
    partition: int = 0,
    offset: int = 0,
) -> SpanRecord:
    """A step span as hoptrace's instrumentation makes it (emitted record included)."""
    step = spec.step(step_id)
    attrs: dict[str, Any] = {
        "hoptrace.pipeline": spec.name,
        "hoptrace.step": step_id,
        "hoptrace.step.outcome": outcome,
        "hoptrace.correlation_id": cid,
    }
    if step.consumes:
        attrs |= {
            "messaging.destination.name": step.consumes,
            "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset,
            "messaging.consumer.group.name": step.group,
        }
    if step.emits and outcome != "error":
        attrs |= {
            "hoptrace.emit.topic": step.emits,
            "hoptrace.emit.partition": partition,
            "hoptrace.emit.offset": offset,
        }
    return SpanRecord(
        trace_id=trace,
        span_id=span_id,
        parent_span_id=parent,
        name=step_id,
        service=step.service,
        kind=int(SpanKind.CONSUMER if step.consumes else SpanKind.PRODUCER),
        start_time=at,
        end_time=at + timedelta(milliseconds=40),
        status_code=2 if outcome == "error" else 1,
        step=step_id,
        outcome=outcome,
        attributes=attrs,
        correlation_id=cid,
        pipeline=spec.name,
    )


def own_send(
    spec: PipelineSpec,
    step_id: str,
    *,
    cid: str,
    trace: str,
    at: datetime,
    span_id: str,
    parent: str,
) -> SpanRecord:
    """The send span under a hoptrace step span (its record's traceparent names it)."""
    step = spec.step(step_id)
    return SpanRecord(
        trace_id=trace,
        span_id=span_id,
        parent_span_id=parent,
        name=f"{step.emits} send",
        service=step.service,
        kind=int(SpanKind.PRODUCER),
        start_time=at + timedelta(milliseconds=10),
        end_time=at + timedelta(milliseconds=20),
        attributes={
            "messaging.system": "kafka",
            "messaging.destination.name": step.emits,
            "messaging.operation.type": "publish",
            "hoptrace.correlation_id": cid,
        },
        correlation_id=cid,
    )
