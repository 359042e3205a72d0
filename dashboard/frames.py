"""Pure conversions from the collector API's read results to pandas frames and plain words.

The API returns dataclasses / pydantic models (or dicts); most of what is here reads fields
through :func:`get`, so the pages work with either and are testable with small fixture objects.
``kafka_rows`` and ``db_rows`` read the API's own ``Evidence`` (a diagnosis's ``facts``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from hoptrace.contract import STATES, StepStatus
from hoptrace.contract.conventions import ATTR_OUTCOME, ATTR_STEP
from hoptrace.dashboard.words import ITEMS, status_words

if TYPE_CHECKING:
    from hoptrace.collector.api import Evidence

STATUS_ICONS: dict[str, str] = {
    StepStatus.DONE: "✅",
    StepStatus.FAILED: "❌",
    StepStatus.PENDING: "⏳",
    StepStatus.STALLED: "🛑",
    StepStatus.NOT_REACHED: "⚪",
}
STOP_MARKER = "⛔ STOPPED HERE"


def get(obj: Any, name: str, default: Any = None) -> Any:
    """Field ``name`` of a dict, dataclass or model; enums become their value."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        value = obj.get(name, default)
    else:
        value = getattr(obj, name, default)
    if isinstance(value, Enum):
        value = value.value
    return value


def first(obj: Any, *names: str, default: Any = None) -> Any:
    """The first of several field names that is set (the API's spelling may vary)."""
    for name in names:
        value = get(obj, name)
        if value is not None:
            return value
    return default


def as_datetime(value: Any) -> datetime | None:
    """A timezone-aware datetime from a datetime, an ISO string or epoch seconds/nanoseconds."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        seconds = value / 1e9 if value > 1e12 else value
        return datetime.fromtimestamp(seconds, tz=UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def as_seconds(value: Any) -> float | None:
    """Seconds from a timedelta or a number (seconds)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def human_duration(seconds: float | None) -> str:
    """``93.5`` -> ``1m 33s``; short and readable."""
    if seconds is None:
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def lookup_link(correlation_id: str, base: str = "") -> str:
    """The dashboard link to one correlation's lookup (``?id=...``)."""
    return f"{base.rstrip('/')}/?id={quote(str(correlation_id), safe='')}"


def jaeger_link(jaeger_url: str | None, trace_id: str) -> str | None:
    """The trace's page in Jaeger; None when no Jaeger is configured."""
    return f"{jaeger_url.rstrip('/')}/trace/{trace_id}" if jaeger_url else None


def steps_frame(diagnosis: Any) -> pd.DataFrame:
    """One row per pipeline step, in order, with the stop marker on the step where it stopped
    (and on each other step where an unfinished branch stopped)."""
    stopped_at = get(diagnosis, "stopped_at")
    stops = {stopped_at, *(get(diagnosis, "stopped_at_all", None) or ())} - {None}
    redrives = redrives_of(diagnosis)
    rows = []
    for step in get(diagnosis, "steps", []) or []:
        step_id = first(step, "id", "step")
        done_again = [r.line() for r in redrives if r.step == step_id]
        status = str(get(step, "status", ""))
        started = as_datetime(get(step, "started_at"))
        ended = as_datetime(get(step, "ended_at"))
        rows.append(
            {
                "step": step_id,
                "service": get(step, "service", ""),
                "status": f"{STATUS_ICONS.get(status, '')} {status_words(status)}".strip(),
                "started_at": started,
                "ended_at": ended,
                "took": human_duration((ended - started).total_seconds())
                if started and ended
                else "—",
                "marker": STOP_MARKER if step_id in stops else "",
                "evidence": list(get(step, "evidence", []) or []) + done_again,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "step",
            "service",
            "status",
            "started_at",
            "ended_at",
            "took",
            "marker",
            "evidence",
        ],
    )


def redrives_of(diagnosis: Any) -> list[Any]:
    """The correlation's audited redrives (``Evidence.redrives`` of the diagnosis' facts)."""
    try:
        return list(get(diagnosis, "facts").redrives or ())
    except AttributeError:  # no facts (a fixture, a read API's diagnosis)
        return []


def redrive_marks(diagnosis: Any) -> list[tuple[datetime, str]]:
    """The timeline's redrive marks: (when, "redrive #N <step>: <result>")."""
    return [(r.at, f"redrive #{r.id} {r.step}: {r.result}") for r in redrives_of(diagnosis)]


def spans_frame(
    spans: Iterable[Any], span_steps: Mapping[tuple[str, str], str] | None = None
) -> pd.DataFrame:
    """Spans as rows for the Gantt chart: step (or span name), service, start, end, trace id.
    A span's step is the one the diagnosis matched it to (``span_steps``: (trace id, span id) ->
    step, from ``StepMatcher.step_of``: a consumer span of a service hoptrace did not write is
    its step's run too), else the step it names itself."""
    matched = span_steps or {}
    rows = []
    for span in spans or []:
        start = as_datetime(
            first(span, "start_time", "started_at", "start", "start_time_unix_nano")
        )
        end = as_datetime(first(span, "end_time", "ended_at", "end", "end_time_unix_nano"))
        if start is None:
            continue
        if end is None or end <= start:
            end = start + timedelta(milliseconds=1)
        attributes = get(span, "attributes", {}) or {}
        key = (first(span, "trace_id", default=""), first(span, "span_id", default=""))
        step = matched.get(key) or first(span, "step", default=None) or attributes.get(ATTR_STEP)
        name = get(span, "name", "")
        status = first(span, "status", "status_code", default="")
        outcome = first(span, "outcome", default=None) or attributes.get(ATTR_OUTCOME)
        rows.append(
            {
                "lane": step or f"{first(span, 'service', default='?')}: {name}",
                "name": name,
                "service": first(span, "service", "service_name", default="") or "",
                "start": start,
                "end": end,
                "duration_ms": (end - start).total_seconds() * 1000,
                "trace_id": first(span, "trace_id", default="") or "",
                "status": str(status or ""),
                "outcome": str(outcome or ""),
            }
        )
    cols = [
        "lane",
        "name",
        "service",
        "start",
        "end",
        "duration_ms",
        "trace_id",
        "status",
        "outcome",
    ]
    return pd.DataFrame(rows, columns=cols).sort_values("start", kind="stable")


def facts_frame(facts: Any) -> pd.DataFrame:
    """Kafka or database facts (a list of records, or a mapping) as a table."""
    if facts is None:
        return pd.DataFrame()
    if isinstance(facts, Mapping):
        values = list(facts.values())
        if values and all(isinstance(v, Mapping) or hasattr(v, "__dict__") for v in values):
            rows = [{"key": k, **_record(v)} for k, v in facts.items()]
        else:
            rows = [{"fact": k, "value": _plain(v)} for k, v in facts.items()]
        return pd.DataFrame(rows)
    return pd.DataFrame([_record(f) for f in facts])


def _record(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        data = dict(obj)
    elif hasattr(obj, "model_dump"):
        data = obj.model_dump()
    elif hasattr(obj, "__dataclass_fields__"):
        data = {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    elif hasattr(obj, "__dict__"):
        data = dict(vars(obj))
    else:
        data = {"value": obj}
    return {k: _plain(v) for k, v in data.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple | set):
        return ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


def state_counts_frame(counts: Any) -> pd.DataFrame:
    """Counts by state, always with the four states in order (missing ones are 0)."""
    if isinstance(counts, Mapping):
        data = {str(k): int(v) for k, v in counts.items()}
    else:
        data = {
            str(first(c, "state")): int(first(c, "count", "n", default=0)) for c in counts or []
        }
    states = [str(s) for s in STATES]
    ordered = states + sorted(k for k in data if k not in states)
    return pd.DataFrame({"state": ordered, "count": [data.get(s, 0) for s in ordered]})


def funnel_frame(funnel: Any, step_order: list[str] | None = None) -> pd.DataFrame:
    """Payments by last completed step, in pipeline order."""
    if isinstance(funnel, Mapping):
        data = {str(k): int(v) for k, v in funnel.items()}
    else:
        data = {
            str(first(f, "step", "last_step", "last_done_step", default="(none)")): int(
                first(f, "count", "n", default=0)
            )
            for f in funnel or []
        }
    order = list(step_order or [])
    keys = [k for k in order if k in data] + [k for k in data if k not in order]
    return pd.DataFrame({"step": keys, "count": [data[k] for k in keys]})


def last_step_frame(funnel: pd.DataFrame, total: int) -> pd.DataFrame:
    """Payments by their LAST completed step, from the cumulative funnel (steps in order):
    done(step i) - done(step i+1); ``(none)`` for payments with no step done."""
    counts = funnel["count"].tolist()
    after = counts[1:] + [0]
    rows = [{"last completed step": "(none)", ITEMS: max(0, total - (counts[0] if counts else 0))}]
    rows += [
        {"last completed step": step, ITEMS: max(0, n - nxt)}
        for step, n, nxt in zip(funnel["step"], counts, after, strict=True)
    ]
    return pd.DataFrame(rows)


def latency_frames(latencies: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(percentiles per hop, raw samples) from either raw samples or precomputed percentiles.

    Accepts a mapping ``hop -> [seconds, ...]`` or ``hop -> HopLatency(step, samples)``, records
    with ``hop``/``step`` and ``seconds`` (one sample each), or records with ``p50``/``p95``/``p99``
    (precomputed; histogram data then comes from an optional ``samples`` field)."""
    per_hop: dict[str, list[float]] = {}
    stats: list[dict[str, Any]] = []
    if isinstance(latencies, Mapping):
        for hop, values in latencies.items():
            if not isinstance(values, list | tuple):
                values = get(values, "samples")  # e.g. a HopLatency(step, samples)
            if isinstance(values, list | tuple):
                per_hop.setdefault(str(hop), []).extend(as_seconds(v) for v in values)
    else:
        for rec in latencies or []:
            hop = str(first(rec, "hop", "step", "to_step", default="?"))
            if get(rec, "p50") is not None:
                stats.append(_stat_row(hop, rec))
                per_hop.setdefault(hop, []).extend(
                    as_seconds(v) for v in get(rec, "samples", []) or []
                )
            else:
                value = first(rec, "seconds", "latency", "duration", "value")
                per_hop.setdefault(hop, []).append(as_seconds(value))
    arrays = {
        hop: arr[~np.isnan(arr)]
        for hop, values in per_hop.items()
        if values
        for arr in [np.asarray([np.nan if v is None else v for v in values], dtype=float)]
    }
    arrays = {hop: arr for hop, arr in arrays.items() if arr.size}
    if not stats:
        for hop, arr in arrays.items():
            p50, p95, p99 = np.percentile(arr, [50, 95, 99])
            stats.append(
                {"hop": hop, "count": int(arr.size), "p50_s": p50, "p95_s": p95, "p99_s": p99}
            )
    samples_df = pd.DataFrame(
        {
            "hop": np.concatenate([np.full(a.size, h, dtype=object) for h, a in arrays.items()])
            if arrays
            else np.array([], dtype=object),
            "seconds": np.concatenate(list(arrays.values())) if arrays else np.array([]),
        }
    )
    stats_df = pd.DataFrame(stats, columns=["hop", "count", "p50_s", "p95_s", "p99_s"])
    return stats_df, samples_df


def _stat_row(hop: Any, rec: Any) -> dict[str, Any]:
    return {
        "hop": str(hop),
        "count": int(first(rec, "count", "n", default=0)),
        "p50_s": as_seconds(get(rec, "p50")),
        "p95_s": as_seconds(get(rec, "p95")),
        "p99_s": as_seconds(get(rec, "p99")),
    }


def stalled_frame(
    stalled: Iterable[Any], now: datetime | None = None, base: str = ""
) -> pd.DataFrame:
    """Stalled correlations with the step they wait on, overdue time and a lookup link."""
    now = now or datetime.now(UTC)
    rows = []
    for item in stalled or []:
        cid = str(first(item, "correlation_id", "id"))
        overdue = as_seconds(first(item, "overdue_by", "overdue", "overdue_seconds"))
        deadline = as_datetime(first(item, "deadline", "due_at", "deadline_at"))
        if overdue is None and deadline is not None:
            overdue = (now - deadline).total_seconds()
        rows.append(
            {
                "correlation_id": cid,
                "step": first(item, "step", "next_step", "waiting_on", default=""),
                "overdue_by": human_duration(overdue),
                "overdue_s": overdue,
                "since": as_datetime(first(item, "since", "stalled_since", "last_seen")),
                "lookup": lookup_link(cid, base),
            }
        )
    cols = ["correlation_id", "step", "overdue_by", "overdue_s", "since", "lookup"]
    return pd.DataFrame(rows, columns=cols)


def alerts_frame(alerts: Iterable[Any], base: str = "") -> pd.DataFrame:
    """Alerts with status, step, cause and links."""
    rows = []
    for alert in alerts or []:
        labels = get(alert, "labels", {}) or {}
        annotations = get(alert, "annotations", {}) or {}
        cid = first(alert, "correlation_id", default=None) or labels.get("correlation_id", "")
        status = str(first(alert, "status", "state", default=""))
        resolved_at = as_datetime(first(alert, "resolved_at", "ends_at", "endsAt"))
        if not status:
            status = "resolved" if resolved_at else "firing"
        rows.append(
            {
                "status": status,
                "correlation_id": str(cid),
                "step": first(alert, "step", default=None) or labels.get("step", ""),
                "cause": first(alert, "cause", default=None) or labels.get("cause", ""),
                "evidence": first(alert, "evidence", "summary", default=None)
                or annotations.get("evidence", annotations.get("summary", "")),
                "fired_at": as_datetime(first(alert, "fired_at", "starts_at", "startsAt")),
                "resolved_at": resolved_at,
                "lookup": lookup_link(str(cid), base) if cid else "",
                "jaeger": first(alert, "jaeger_url", default=None)
                or annotations.get("jaeger_url", ""),
            }
        )
    cols = [
        "status",
        "correlation_id",
        "step",
        "cause",
        "evidence",
        "fired_at",
        "resolved_at",
        "lookup",
        "jaeger",
    ]
    return pd.DataFrame(rows, columns=cols)


def kafka_rows(evidence: Evidence | None) -> list[dict[str, Any]]:
    """Per step: its topic and group, the record this payment produced into the topic, the
    group's committed offset, the lag, members, DLQ (from ``Evidence.kafka``)."""
    rows = []
    for step, kf in (evidence.kafka if evidence else {}).items():
        record, dlq = kf.record, kf.dlq
        rows.append(
            {
                "step": step,
                "topic": kf.topic,
                "topic exists": kf.topic_exists,
                "partition": record.partition if record else None,
                "produced offset": record.offset if record else None,
                "group": kf.group,
                "members": kf.group_members,
                "committed offset": kf.committed_offset,
                "end offset": kf.end_offset,
                "lag": kf.lag,
                "consumed": kf.record_consumed,
                "DLQ": f"{dlq.topic}[{dlq.partition}]@{dlq.offset}"
                if dlq
                else ("none" if kf.dlq_checked else "not checked"),
            }
        )
    return [{k: _plain(v) for k, v in r.items()} for r in rows]


def db_rows(evidence: Evidence | None) -> list[dict[str, Any]]:
    """The payment's processed marks (by processed table) and, per step, whether its effect row
    exists; then the sources that could not be read."""
    rows: list[dict[str, Any]] = []
    if evidence is None:
        return rows
    processed = evidence.processed
    if processed is None:
        rows.append({"what": "processed_events", "fact": "not read"})
    elif not processed:
        rows.append({"what": "processed_events", "fact": "no row for this payment"})
    for p in processed or []:
        when = as_datetime(p.processed_at)
        rows.append(
            {
                "what": p.table or "processed_events",
                "fact": f"{p.event_type or p.event_id} processed by {p.source or '?'}"
                + (f" at {when:%H:%M:%S}" if when else ""),
            }
        )
    for step, exists in evidence.effects.items():
        fact = "not read" if exists is None else ("row exists" if exists else "NO ROW")
        rows.append({"what": f"effect row of {step}", "fact": fact})
    for source, reason in evidence.missing.items():
        rows.append({"what": f"{source} (missing evidence)", "fact": reason})
    return rows
