"""Correlation progress: fold step-span observations into a correlation's state. Pure functions.

Rules (order-independent and idempotent per span, so out-of-order and duplicate spans are fine):
- a step is *done* once any execution of it ended with outcome ``ok`` or ``duplicate`` (or had no
  outcome and no error status); its ``done_at`` is the earliest such end;
- ``last_step`` is the done step with the highest spec index (it only moves forward);
- ``failed``: some step after ``last_step`` errored and is not done (the first such step);
- ``completed``: the last spec step is done;
- otherwise ``in_progress`` with ``next_step`` and ``next_deadline = done_at(last) + deadline``;
  a correlation the stall scanner marked ``stalled`` stays stalled until it progresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hoptrace.instrumentation.spec import PipelineSpec

from .decode import (
    I_CID,
    I_END,
    I_NAME,
    I_OUTCOME,
    I_PIPELINE,
    I_START,
    I_STATUS,
    I_STATUS_MSG,
    I_STEP,
    SpanRow,
    us_to_dt,
)

STATES = ("in_progress", "completed", "failed", "stalled")


@dataclass(frozen=True, slots=True)
class StepObs:
    """One execution of a step, as seen in one span."""

    correlation_id: str
    step: str
    start: datetime
    end: datetime
    outcome: str  # ok | duplicate | error
    error: str | None = None


def observations(rows: list[SpanRow], spec: PipelineSpec) -> dict[str, list[StepObs]]:
    """Step executions in a batch of span rows, grouped by correlation id. A span counts when it
    carries a correlation id and a step of ``spec`` (and is the step span: named after the step,
    or carrying an outcome)."""
    steps = {s.id for s in spec.steps}
    out: dict[str, list[StepObs]] = {}
    for r in rows:
        cid = r[I_CID]
        step = r[I_STEP]
        if cid is None or step not in steps:
            continue
        if r[I_PIPELINE] is not None and r[I_PIPELINE] != spec.name:
            continue
        outcome = r[I_OUTCOME]
        if outcome is None and r[I_NAME] != step:
            continue
        if outcome not in ("ok", "duplicate", "error"):
            outcome = "error" if r[I_STATUS] == 2 else "ok"
        err = r[I_STATUS_MSG] if outcome == "error" else None
        start, end = us_to_dt(r[I_START]), us_to_dt(r[I_END])
        out.setdefault(cid, []).append(StepObs(cid, step, start, end, outcome, err))
    return out


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _dt(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


def _min(a: str | None, b: datetime) -> str:
    return b.isoformat() if a is None or b < datetime.fromisoformat(a) else a


def _max(a: str | None, b: datetime) -> str:
    return b.isoformat() if a is None or b > datetime.fromisoformat(a) else a


def fold(
    spec: PipelineSpec, row: dict[str, Any] | None, obs: list[StepObs], now: datetime
) -> dict[str, Any]:
    """The new correlation row after ``obs`` (``row`` is the current row or None).

    Returned keys: correlation_id, pipeline, state, last_step, last_step_index, last_step_at,
    failed_step, failed_at, error, next_step, next_deadline, first_seen, completed_at, steps,
    resolved (True when a stalled correlation moved on: its alert must resolve).
    """
    cid = obs[0].correlation_id
    steps: dict[str, dict[str, Any]] = {
        k: dict(v) for k, v in ((row or {}).get("steps") or {}).items()
    }
    first_seen = (row or {}).get("first_seen")
    for o in obs:
        first_seen = o.start if first_seen is None or o.start < first_seen else first_seen
        st = steps.setdefault(
            o.step,
            {
                "first_start": None,
                "last_end": None,
                "done_at": None,
                "outcome": None,
                "count": 0,
                "ok": 0,
                "duplicate": 0,
                "error": 0,
                "last_error": None,
                "error_at": None,
            },
        )
        st["count"] += 1
        st[o.outcome] += 1
        st["first_start"] = _min(st["first_start"], o.start)
        st["last_end"] = _max(st["last_end"], o.end)
        if o.outcome == "error":
            if st["error_at"] is None or o.end >= datetime.fromisoformat(st["error_at"]):
                st["error_at"] = o.end.isoformat()
                st["last_error"] = o.error
        else:
            st["done_at"] = _min(st["done_at"], o.end)
        st["outcome"] = "ok" if st["ok"] else ("duplicate" if st["duplicate"] else "error")

    last_idx: int | None = None
    for i, s in enumerate(spec.steps):
        if s.id in steps and steps[s.id]["done_at"] is not None:
            last_idx = i
    new: dict[str, Any] = {
        "correlation_id": cid,
        "pipeline": spec.name,
        "first_seen": first_seen,
        "steps": steps,
        "last_step": None,
        "last_step_index": last_idx,
        "last_step_at": None,
        "failed_step": None,
        "failed_at": None,
        "error": None,
        "next_step": None,
        "next_deadline": None,
        "completed_at": None,
    }
    if last_idx is not None:
        last = spec.steps[last_idx]
        new["last_step"] = last.id
        new["last_step_at"] = _dt(steps[last.id]["done_at"])
    start = 0 if last_idx is None else last_idx + 1
    for s in spec.steps[start:]:
        st = steps.get(s.id)
        if st and st["error"] and st["done_at"] is None:
            new["failed_step"] = s.id
            new["failed_at"] = _dt(st["error_at"])
            new["error"] = st["last_error"]
            break
    old_state = (row or {}).get("state")
    old_idx = (row or {}).get("last_step_index")
    if last_idx == len(spec.steps) - 1:
        state = "completed"
        new["completed_at"] = new["last_step_at"]
    elif new["failed_step"] is not None:
        state = "failed"
    else:
        if last_idx is not None:
            nxt = spec.steps[last_idx + 1]
            new["next_step"] = nxt.id
            new["next_deadline"] = new["last_step_at"] + nxt.deadline
        progressed = last_idx is not None and (old_idx is None or last_idx > old_idx)
        state = "stalled" if old_state == "stalled" and not progressed else "in_progress"
    new["state"] = state
    new["resolved"] = old_state == "stalled" and state in ("in_progress", "completed")
    return new
