"""The read API's JSON shapes, one function per kind of row, shared by the API, the CLI and the
dashboard's HTTP source so that each document reads the same whichever path produced it.

Times are ISO 8601 with an offset (microseconds, as stored); durations are seconds. The trace
document itself is ``render.to_dict`` (``docs/trace-json-schema.json``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from .diagnosis import Diagnosis
from .store import AlertRow, HopLatency, SpanRecord, StallRow


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def unknown_id_message(cid: str) -> str:
    """What the CLI and the API say of a well-formed id nothing carries."""
    return (
        f"no payment with id {cid!r} is known: no span, processed_events row or effect row "
        "carries it (check the id, or whether its spans reached the collector)"
    )


def store_unreadable_message(reason: str) -> str:
    return f"the span store could not be read: {reason}"


def not_found_reason(d: Diagnosis) -> tuple[int, str]:
    """A lookup that found nothing: (HTTP status, message); 503 when the span store was
    unreadable (nothing can be said), 404 when the id is unknown."""
    if "spans" in d.missing:
        return 503, store_unreadable_message(d.missing["spans"])
    return 404, unknown_id_message(d.correlation_id)


def stall_json(rows: Iterable[StallRow]) -> list[dict[str, Any]]:
    """``hoptrace stalls --json`` and ``GET /api/v1/stalls``."""
    return [
        {
            "correlation_id": r.correlation_id,
            "pipeline": r.pipeline,
            "state": r.state,
            "step": r.step,
            "last_step": r.last_step,
            "since": r.since.isoformat(),
            "overdue_by_seconds": round(r.overdue_by.total_seconds(), 3),
            "last_error": r.error,
        }
        for r in rows
    ]


def alert_json(a: AlertRow) -> dict[str, Any]:
    return {
        "id": a.id,
        "correlation_id": a.correlation_id,
        "pipeline": a.pipeline,
        "step": a.step,
        "status": a.status,
        "fired_at": iso(a.fired_at),
        "resolved_at": iso(a.resolved_at),
        "cause": a.cause,
        "evidence": a.evidence,
        "delivered_firing": a.delivered_firing,
        "delivered_resolved": a.delivered_resolved,
        "attempts": a.attempts,
        "last_error": a.last_error,
    }


def span_json(s: SpanRecord, matched: Mapping[tuple[str, str], str]) -> dict[str, Any]:
    """A span for a timeline: ``step`` is the step the diagnosis matched it to (else its own)."""
    return {
        "trace_id": s.trace_id,
        "span_id": s.span_id,
        "parent_span_id": s.parent_span_id,
        "name": s.name,
        "service": s.service,
        "kind": s.kind,
        "start_time": iso(s.start_time),
        "end_time": iso(s.end_time),
        "status_code": s.status_code,
        "status_message": s.status_message,
        "step": matched.get((s.trace_id, s.span_id)) or s.step,
        "outcome": s.outcome,
    }


def latency_json(lat: HopLatency, samples: bool) -> dict[str, Any]:
    """A hop's percentiles (seconds), with its samples when asked for (a histogram)."""
    out: dict[str, Any] = {
        "count": len(lat.samples),
        "p50": lat.p50,
        "p95": lat.p95,
        "p99": lat.p99,
    }
    if samples:
        out["samples"] = [round(v, 6) for v in lat.samples]
    return out
