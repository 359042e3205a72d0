"""Write a spec :class:`~hoptrace.collector.discover.Proposal` as TOML: valid TOML that
``load_spec`` reads, every value commented with what it was seen from and what to check, steps
not reached from the first step commented out, a consumer group the spans do not name as a
``# group = "?"`` placeholder."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from hoptrace.contract.spec import DEFAULT_CORRELATION_COLUMN, CorrelationCarriers

from .discover import MARGIN, MIN_DEADLINE, Proposal, duration


def render(proposal: Proposal, header: Iterable[str] = ()) -> str:
    """The proposal as a TOML spec, every value commented with what it was seen from."""
    lines = [f"# {_comment(h)}" for h in header]
    lines += [
        "# Check every value before use; an effect table's correlation column is",
        f'# "{DEFAULT_CORRELATION_COLUMN}" unless a step sets correlation_column.',
        f"# deadline: the observed p99 of (step done - previous step done) x{MARGIN}, rounded up,",
        f"# at least {duration(MIN_DEADLINE.total_seconds())}.",
        "",
        "[pipeline]",
        _kv("name", proposal.name, proposal.notes.get("name")),
        _kv(
            "correlation_key",
            DEFAULT_CORRELATION_COLUMN,
            "the payload field holding the id (not in spans): check",
        ),
        "",
        "[pipeline.correlation]",
    ]
    carriers = CorrelationCarriers(baggage=proposal.baggage, message_key=proposal.message_key)
    for f in fields(carriers):  # the table's keys are the carriers' fields
        value = getattr(carriers, f.name)
        if value or value != f.default:  # a false or empty default goes unsaid
            lines.append(_kv(f.name, value, getattr(proposal, f"{f.name}_note", None)))
    for step in proposal.steps:
        block = [f"# {_comment(step.title)}"] if step.title else []
        block.append("[[steps]]")
        for key in ("id", "service", "consumes", "group", "event_type", "calls", "emits"):
            value = getattr(step, key)
            if value is not None:
                block.append(_kv(key, value, step.notes.get(key)))
            elif key == "group" and step.consumes:
                block.append(f"# {_kv(key, '?', step.notes.get(key))}")
        if step.after:
            block.append(_kv("after", list(step.after), None))
        if step.table is not None:
            block.append(_kv("table", step.table, step.notes.get("table")))
        elif "table" in step.notes:
            block.append(f"# {_kv('table', '?', step.notes.get('table'))}")
        block.append(_kv("deadline", step.deadline, step.notes.get("deadline")))
        if not step.enabled:
            block = [line if line.startswith("#") else f"# {line}" for line in block]
        lines += ["", *block]
    return "\n".join(lines) + "\n"


def _kv(key: str, value: Any, note: str | None) -> str:
    text = f"{key} = {_toml(value)}"
    return f"{text:<40} # {_comment(note)}" if note else text


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value)).replace("\x7f", "\\u007f")


def _comment(text: str | None) -> str:
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text or "")
