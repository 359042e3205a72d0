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

from datetime import datetime
from typing import Any, NamedTuple

from hoptrace.contract import OUTCOMES, Outcome, PipelineSpec, State
from hoptrace.contract.conventions import STATUS_ERROR

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

_OK, _DUPLICATE, _ERROR = Outcome.OK.value, Outcome.DUPLICATE.value, Outcome.ERROR.value
_OUTCOMES = frozenset(OUTCOMES)
_STALLED = State.STALLED.value
#: Pipelines of up to this many steps get a ``done_mask`` (an int4 column); longer ones store
#: NULL and the funnel counts from ``steps`` instead.
MASK_STEPS = 31


class StepObs(NamedTuple):
    """One execution of a step, as seen in one span (times in microseconds since the epoch)."""

    correlation_id: str
    step: str
    start_us: int
    end_us: int
    outcome: str  # ok | duplicate | error
    error: str | None = None


def observations(rows: list[SpanRow], spec: PipelineSpec) -> dict[str, list[StepObs]]:
    """Step executions in a batch of span rows, grouped by correlation id. A span counts when it
    carries a correlation id and a step of ``spec`` (and is the step span: named after the step,
    or carrying an outcome)."""
    steps = {s.id for s in spec.steps}
    name = spec.name
    out: dict[str, list[StepObs]] = {}
    for r in rows:
        cid = r[I_CID]
        step = r[I_STEP]
        if cid is None or step not in steps:
            continue
        if r[I_PIPELINE] is not None and r[I_PIPELINE] != name:
            continue
        outcome = r[I_OUTCOME]
        if outcome is None and r[I_NAME] != step:
            continue
        if outcome not in _OUTCOMES:
            outcome = _ERROR if r[I_STATUS] == STATUS_ERROR else _OK
        err = r[I_STATUS_MSG] if outcome == _ERROR else None
        obs = StepObs(cid, step, r[I_START], r[I_END], outcome, err)
        if cid in out:
            out[cid].append(obs)
        else:
            out[cid] = [obs]
    return out


def _dt(us: int | None) -> datetime | None:
    return us_to_dt(us) if us is not None else None


def fold(
    spec: PipelineSpec, row: dict[str, Any] | None, obs: list[StepObs], now: datetime
) -> dict[str, Any]:
    """The new correlation row after ``obs`` (``row`` is the current row or None).

    ``row["steps"]`` / the returned ``steps``: per step id ``{first_start, last_end, done_at,
    error_at}`` (integer microseconds since the epoch, done_at/error_at may be null), ``outcome``,
    ``count``, ``ok``, ``duplicate``, ``error``, ``last_error``.
    Returned keys: correlation_id, pipeline, state, last_step, last_step_index, last_step_at,
    failed_step, failed_at, error, next_step, next_deadline, first_seen, completed_at, steps,
    done_mask (bit i: spec step i done), resolved (True when a stalled correlation moved on: its
    alert must resolve).
    """
    cid = obs[0].correlation_id
    old = row or {}
    steps: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (old.get("steps") or {}).items()}
    first_us = min(o.start_us for o in obs)
    first_seen = old.get("first_seen")
    first_dt = us_to_dt(first_us)
    if first_seen is None or first_dt < first_seen:
        first_seen = first_dt
    for o in obs:
        st = steps.get(o.step)
        if st is None:
            st = steps[o.step] = {
                "first_start": o.start_us, "last_end": o.end_us, "done_at": None, "error_at": None,
                "outcome": None, "count": 0, _OK: 0, _DUPLICATE: 0, _ERROR: 0, "last_error": None,
            }  # fmt: skip
        st["count"] += 1
        st[o.outcome] += 1
        if o.start_us < st["first_start"]:
            st["first_start"] = o.start_us
        if o.end_us > st["last_end"]:
            st["last_end"] = o.end_us
        if o.outcome == _ERROR:
            if st["error_at"] is None or o.end_us >= st["error_at"]:
                st["error_at"] = o.end_us
                st["last_error"] = o.error
        elif st["done_at"] is None or o.end_us < st["done_at"]:
            st["done_at"] = o.end_us
        st["outcome"] = _OK if st[_OK] else (_DUPLICATE if st[_DUPLICATE] else _ERROR)

    last_idx: int | None = None
    mask = 0
    for i, s in enumerate(spec.steps):
        st = steps.get(s.id)
        if st is not None and st["done_at"] is not None:
            last_idx = i
            mask |= 1 << i
    last_step: str | None = None
    last_step_at: datetime | None = None
    if last_idx is not None:
        last_step = spec.steps[last_idx].id
        last_step_at = us_to_dt(steps[last_step]["done_at"])
    failed_step: str | None = None
    failed_at: datetime | None = None
    error: str | None = None
    start = 0 if last_idx is None else last_idx + 1
    for s in spec.steps[start:]:
        st = steps.get(s.id)
        if st and st[_ERROR] and st["done_at"] is None:
            failed_step, failed_at, error = s.id, _dt(st["error_at"]), st["last_error"]
            break
    next_step: str | None = None
    next_deadline: datetime | None = None
    completed_at: datetime | None = None
    old_state = old.get("state")
    old_idx = old.get("last_step_index")
    if last_idx == len(spec.steps) - 1:
        state = State.COMPLETED.value
        completed_at = last_step_at
    elif failed_step is not None:
        state = State.FAILED.value
    else:
        if last_idx is not None and last_step_at is not None:
            nxt = spec.steps[last_idx + 1]
            next_step = nxt.id
            next_deadline = last_step_at + nxt.deadline
        progressed = last_idx is not None and (old_idx is None or last_idx > old_idx)
        state = _STALLED if old_state == _STALLED and not progressed else State.IN_PROGRESS.value
    return dict(
        correlation_id=cid,
        pipeline=spec.name,
        first_seen=first_seen,
        steps=steps,
        last_step=last_step,
        last_step_index=last_idx,
        done_mask=mask if len(spec.steps) <= MASK_STEPS else None,
        last_step_at=last_step_at,
        failed_step=failed_step,
        failed_at=failed_at,
        error=error,
        next_step=next_step,
        next_deadline=next_deadline,
        completed_at=completed_at,
        state=state,
        # any way out of stalled (on, done, or failed further on) ends the stall's alert
        resolved=old_state == _STALLED and state != _STALLED,
    )
