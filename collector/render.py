"""A Diagnosis as text (terminal), markdown (an incident ticket) or JSON (the stable schema in
``docs/trace-json-schema.json``, ``version`` 1). JSON objects are built with ``dict(name=...)``:
their keys are the schema's field names.

Evidence carries text services wrote (span status messages, exception messages, DLQ reasons):
text and markdown output is made printable line by line (:func:`printable`: ANSI escape
sequences and C0/C1 control characters removed, a line break inside a value becomes a space), and
JSON escapes DEL and the C1 controls too (JSON itself escapes C0), so nothing a span says reaches
a terminal as a control."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from hoptrace.contract import TRACE_SCHEMA_VERSION, StepStatus

from .diagnosis import Diagnosis, StepResult
from .records import KafkaFacts, RecordRef
from .stepview import redrive_lines

SCHEMA_VERSION = TRACE_SCHEMA_VERSION

#: The mark of each step status in text and markdown.
MARK: dict[str, str] = {
    StepStatus.DONE: "✓",
    StepStatus.FAILED: "✗",
    StepStatus.PENDING: "…",
    StepStatus.STALLED: "⏸",
    StepStatus.NOT_REACHED: "·",
}


#: ECMA-48 escape sequences, 7- and 8-bit: CSI (colours, cursor moves), OSC / DCS / SOS / PM /
#: APC strings up to their terminator (hyperlinks, window titles), other two-byte escapes.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
_BREAKS = re.compile(r"[\t\n\v\f\r\u2028\u2029]+")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_JSON_C1 = re.compile(r"[\x7f-\x9f]")


def printable(line: str) -> str:
    """One line of output with no escape sequence and no control character in it."""
    return _CONTROLS.sub("", _BREAKS.sub(" ", _ESCAPES.sub("", line)))


def jaeger_link(jaeger_url: str | None, trace_id: str) -> str | None:
    return f"{jaeger_url.rstrip('/')}/trace/{trace_id}" if jaeger_url else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") if value else None


def _record(ref: RecordRef | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    return dict(topic=ref.topic, partition=ref.partition, offset=ref.offset)


def _kafka(kf: KafkaFacts) -> dict[str, Any]:
    dlq = kf.dlq
    return dict(
        topic=kf.topic,
        topic_exists=kf.topic_exists,
        group=kf.group,
        group_exists=kf.group_exists,
        group_state=kf.group_state,
        group_members=kf.group_members,
        record=_record(kf.record),
        committed_offset=kf.committed_offset,
        end_offset=kf.end_offset,
        lag=kf.lag,
        other_groups=list(kf.other_groups) if kf.other_groups is not None else None,
        other_members=(
            [
                dict(
                    group=m.group, client_id=m.client_id, host=m.host, partitions=list(m.partitions)
                )
                for m in kf.other_members
            ]
            if kf.other_members is not None
            else None
        ),
        dlq=(
            dict(topic=dlq.topic, partition=dlq.partition, offset=dlq.offset, reason=dlq.reason)
            if dlq
            else None
        ),
    )


def _links(jaeger_url: str | None, trace_ids: tuple[str, ...]) -> list[str]:
    return [u for u in (jaeger_link(jaeger_url, t) for t in trace_ids) if u]


def _step_json(s: StepResult, d: Diagnosis, jaeger_url: str | None) -> dict[str, Any]:
    facts = d.facts
    kf = facts.kafka.get(s.id) if facts else None
    return dict(
        id=s.id,
        service=s.service,
        status=s.status,
        started_at=_iso(s.started_at),
        ended_at=_iso(s.ended_at),
        runs=s.runs,
        outcomes=list(s.outcomes),
        evidence=[*s.evidence, *redrive_lines(facts, s.id)],
        trace_ids=list(s.trace_ids),
        jaeger_urls=_links(jaeger_url, s.trace_ids),
        consumed=_record(s.consumed),
        emitted=_record(s.emitted),
        effect_row=facts.effects.get(s.id) if facts else None,
        kafka=_kafka(kf) if kf else None,
    )


def to_dict(d: Diagnosis, jaeger_url: str | None = None) -> dict[str, Any]:
    """The JSON document (schema ``docs/trace-json-schema.json``; keys in its order)."""
    facts = d.facts
    processed = None
    if facts is not None and facts.processed is not None:
        processed = [
            dict(
                event_id=p.event_id,
                event_type=p.event_type,
                source=p.source,
                processed_at=_iso(p.processed_at),
            )
            for p in facts.processed
        ]
    return dict(
        version=SCHEMA_VERSION,
        correlation_id=d.correlation_id,
        pipeline=d.pipeline,
        found=d.found,
        state=d.state,
        stopped_at=d.stopped_at,
        stopped_at_all=list(d.stopped_at_all),
        cause=d.cause,
        summary=d.summary,
        evidence=list(d.evidence),
        next_action=d.next_action,
        warnings=list(d.warnings),
        missing_evidence=dict(d.missing),
        checked_at=_iso(d.checked_at),
        trace_ids=list(d.trace_ids),
        jaeger_urls=_links(jaeger_url, d.trace_ids),
        steps=[_step_json(s, d, jaeger_url) for s in d.steps],
        processed_events=processed,
        queries=list(d.queries),
        gathered_in_ms=round(facts.gathered_in_ms, 2) if facts and facts.gathered_in_ms else None,
    )


def to_json(d: Diagnosis, jaeger_url: str | None = None) -> str:
    text = json.dumps(to_dict(d, jaeger_url), indent=2, ensure_ascii=False)
    # DEL and C1 may only be inside strings: escaped there, the same JSON, terminal-safe
    return _JSON_C1.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _time(value: datetime | None) -> str:
    return value.strftime("%H:%M:%S.%f")[:-3] if value else "-"


def to_text(d: Diagnosis, jaeger_url: str | None = None) -> str:
    """A readable step list: ``▶`` marks the step where it stopped."""
    head = f"{d.correlation_id}  pipeline {d.pipeline}  state {d.state}"
    lines = [head, ""]
    width = max((len(s.id) for s in d.steps), default=10)
    for s in d.steps:
        pointer = _pointer(d, s.id, " ")
        runs = f" x{s.runs}" if s.runs > 1 else ""
        lines.append(
            f"{pointer} {MARK.get(s.status, '?')} {s.id:<{width}}  {s.status:<11} "
            f"{_time(s.started_at):<12} {s.service}{runs}"
        )
        if s.id in d.stopped_at_all or s.id == d.stopped_at or s.status == StepStatus.FAILED:
            for e in s.evidence:
                lines.append(f"      {e}")
        for e in redrive_lines(d.facts, s.id):  # redrives show on every step
            lines.append(f"      {e}")
    lines.append("")
    where = f" at {d.stopped_at}" if d.stopped_at else ""
    lines.append(f"cause: {d.cause}{where}")
    for e in d.evidence:
        lines.append(f"  - {e}")
    lines.append(f"next: {d.next_action}")
    if len(d.stopped_at_all) > 1:
        lines.append(f"branches stopped at: {', '.join(d.stopped_at_all)} (causes in their steps)")
    for w in d.warnings:
        lines.append(f"warning: {w}")
    if d.missing:
        lines.append("missing evidence: " + "; ".join(f"{k}: {v}" for k, v in d.missing.items()))
    for url in _links(jaeger_url, d.trace_ids) or list(d.trace_ids):
        lines.append(f"trace: {url}")
    return "\n".join(map(printable, lines))


def _pointer(d: Diagnosis, step_id: str, other: str) -> str:
    """``▶`` at ``stopped_at``, ``▷`` at the other steps where a branch stopped."""
    if step_id == d.stopped_at:
        return "▶"
    return "▷" if step_id in d.stopped_at_all else other


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(d: Diagnosis, jaeger_url: str | None = None) -> str:
    """A report to paste into an incident ticket."""
    facts = d.facts
    out = [f"## Payment `{d.correlation_id}`: {d.summary}", ""]
    out += [
        f"- **Pipeline:** {d.pipeline}",
        f"- **State:** {d.state}",
        f"- **Stopped at:** {f'`{d.stopped_at}`' if d.stopped_at else 'nowhere (completed)'}",
        *(
            [f"- **Branches stopped at:** {', '.join(f'`{h}`' for h in d.stopped_at_all)}"]
            if len(d.stopped_at_all) > 1
            else []
        ),
        f"- **Cause:** `{d.cause}`",
        f"- **Next action:** {d.next_action}",
        f"- **Checked at:** {_iso(d.checked_at)}",
        "",
        "### Evidence that decided it",
        "",
    ]
    out += [f"- {e}" for e in d.evidence] or ["- (none)"]
    if d.warnings:
        out += ["", "### Warnings", ""]
        out += [f"- {w}" for w in d.warnings]
    if d.missing:
        out += ["", "### Missing evidence", ""]
        out += [f"- {k}: {v}" for k, v in d.missing.items()]
    out += [
        "",
        "### Steps",
        "",
        "| | step | service | status | started | ended | evidence |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in d.steps:
        mark = _pointer(d, s.id, MARK.get(s.status, ""))
        shown = [*s.evidence, *redrive_lines(facts, s.id)]
        ev = "<br>".join(_md_escape(e) for e in shown) or "-"
        out.append(
            f"| {mark} | `{s.id}` | {s.service} | {s.status} | {_iso(s.started_at) or '-'} "
            f"| {_iso(s.ended_at) or '-'} | {ev} |"
        )
    if facts is not None and facts.kafka:
        out += [
            "",
            "### Kafka",
            "",
            "| step | topic | exists | group | members | record | committed | end | lag | other groups | DLQ |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for sid, kf in facts.kafka.items():
            dlq = (
                f"{kf.dlq.topic}[{kf.dlq.partition}]@{kf.dlq.offset}: {kf.dlq.reason}"
                if kf.dlq
                else "-"
            )
            others = ", ".join(kf.other_groups) if kf.other_groups else "-"
            out.append(
                f"| `{sid}` | {kf.topic} | {kf.topic_exists} | {kf.group} | {kf.group_members} "
                f"| {kf.record or '-'} | {kf.committed_offset} | {kf.end_offset} | {kf.lag} "
                f"| {others} | {_md_escape(dlq)} |"
            )
    if facts is not None:
        out += ["", "### processed_events", ""]
        if facts.processed is None:
            out.append("- not read")
        elif not facts.processed:
            out.append("- no row for this correlation")
        else:
            out += ["| event_id | event_type | source | processed_at |", "|---|---|---|---|"]
            out += [
                f"| {p.event_id} | {p.event_type} | {p.source} | {_iso(p.processed_at)} |"
                for p in facts.processed
            ]
        if facts.effects:
            out += ["", "### Effect rows", ""]
            for s in d.steps:
                if s.id in facts.effects:
                    v = facts.effects[s.id]
                    out.append(
                        f"- `{s.id}`: {'row present' if v else 'no row' if v is False else 'unknown'}"
                    )
    if d.trace_ids:
        out += ["", "### Traces", ""]
        for t in d.trace_ids:
            link = jaeger_link(jaeger_url, t)
            out.append(f"- [{t}]({link})" if link else f"- {t}")
    if d.queries:
        out += ["", "### Queries run", "", "```"]
        out += [q.replace("$1", f"'{d.correlation_id}'") for q in d.queries]
        out.append("```")
    return "\n".join(map(printable, out)) + "\n"


def render(d: Diagnosis, fmt: str, jaeger_url: str | None = None) -> str:
    if fmt == "json":
        return to_json(d, jaeger_url)
    if fmt == "markdown":
        return to_markdown(d, jaeger_url)
    if fmt == "text":
        return to_text(d, jaeger_url)
    raise ValueError(f"unknown format {fmt!r}: text, json or markdown")
