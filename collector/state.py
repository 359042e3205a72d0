"""Correlation progress: step runs found in a batch of spans, folded into a correlation's state.
Pure functions (the writer does the reading and writing).

Step runs come from two kinds of spans (the contract's matching rules, ``hoptrace.contract
.matching``): hoptrace's own step spans (step rows), and consumer/producer spans of services
hoptrace did not write (candidate rows, matched by service and topic). A foreign run fails when
its span or a span below it has status ERROR; it may carry no correlation id, then the writer
finds it through its trace (see ``Run``).

The fold (order-independent and idempotent per span, so out-of-order and duplicate spans are
fine):
- a step is *done* once any run of it ended ``ok`` or ``duplicate``; ``done_at`` is the earliest
  such end;
- where the correlation is follows the pipeline's DAG (``hoptrace.contract.progress``):
  ``completed`` when every leaf step is done; ``failed`` when a step due next has failed runs;
  otherwise ``in_progress`` with ``next_step``/``next_deadline``, the frontier step due first
  (none until some step is done);
- ``last_step`` is the done step with the highest spec index;
- a correlation the stall scanner marked ``stalled`` stays stalled until it moves on: the step
  due next changes (a late span of an earlier step is no progress), or its deadline moves to a
  time not yet passed, or the correlation completes or fails. Its old ``next_step`` and
  ``next_deadline`` tell (the writer reads them with the row).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

from hoptrace.contract import OUTCOMES, Outcome, PipelineSpec, State
from hoptrace.contract.conventions import STATUS_ERROR
from hoptrace.contract.matching import StepMatcher
from hoptrace.contract.progress import progress

from .decode import (
    C_CID,
    C_DESTINATION,
    C_END,
    C_GROUP,
    C_KIND,
    C_NAME,
    C_OPERATION,
    C_PARENT,
    C_SERVICE,
    C_SPAN,
    C_START,
    C_STATUS,
    C_STATUS_MSG,
    C_TRACE,
    I_CID,
    I_END,
    I_NAME,
    I_OUTCOME,
    I_PIPELINE,
    I_SPAN,
    I_START,
    I_STATUS,
    I_STATUS_MSG,
    I_STEP,
    I_TRACE,
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


class Run(NamedTuple):
    """A step run of a service hoptrace did not write: its span, and what is known so far.
    ``correlation_id`` None: to be found through the trace; ``failed`` also becomes True when a
    stored span below it failed. ``failed_below``: it failed only through a span below it (whose
    stored exception may say more than the batch's row: see ``runs.settle``)."""

    trace_id: str
    span_id: str
    step: str
    start_us: int
    end_us: int
    failed: bool
    error: str | None
    correlation_id: str | None
    failed_below: bool = False
    #: one of hoptrace's own step runs (its span carried no id under the spec's carriers): the
    #: outcome it reported, which no span below changes
    outcome: str | None = None

    def obs(self, correlation_id: str) -> StepObs:
        outcome = self.outcome or (_ERROR if self.failed else _OK)
        return StepObs(
            correlation_id,
            self.step,
            self.start_us,
            self.end_us,
            outcome,
            self.error if outcome == _ERROR else None,
        )


def observations(
    rows: Iterable[SpanRow], matcher: StepMatcher, unresolved: list[Run] | None = None
) -> dict[str, list[StepObs]]:
    """hoptrace's own step runs in a batch of step rows, grouped by correlation id: the step
    spans of steps of the spec. A run whose span carries no id under the spec's carriers (e.g. a
    pipeline correlated by a custom attribute only) goes to ``unresolved``, to get its trace's."""
    own_step = matcher.own_step
    out: dict[str, list[StepObs]] = {}
    for r in rows:
        cid = r[I_CID]
        if cid is None and unresolved is None:
            continue
        step = own_step(r[I_STEP], r[I_NAME], r[I_OUTCOME], r[I_PIPELINE])
        if step is None:
            continue
        outcome = r[I_OUTCOME]
        if outcome not in _OUTCOMES:
            outcome = _ERROR if r[I_STATUS] == STATUS_ERROR else _OK
        err = r[I_STATUS_MSG] if outcome == _ERROR else None
        if cid is None:
            assert unresolved is not None
            unresolved.append(
                Run(r[I_TRACE], r[I_SPAN], step, r[I_START], r[I_END], outcome == _ERROR, err,
                    None, outcome=outcome)
            )  # fmt: skip
            continue
        obs = StepObs(cid, step, r[I_START], r[I_END], outcome, err)
        if cid in out:
            out[cid].append(obs)
        else:
            out[cid] = [obs]
    return out


def foreign_runs(candidates: list[SpanRow], matcher: StepMatcher) -> list[Run]:
    """Step runs among a batch's candidate spans; a run fails when it has status ERROR or a
    failed span of the batch sits below it (through failed spans: a failure's chain of failed
    parents)."""
    runs: list[Run] = []
    failed_spans: dict[tuple[str, str], tuple[str | None, str]] = {}  # -> (parent, what failed)
    for c in candidates:
        if c[C_STATUS] == STATUS_ERROR:
            what = f"{c[C_NAME]}: {c[C_STATUS_MSG]}" if c[C_STATUS_MSG] else c[C_NAME]
            failed_spans[(c[C_TRACE], c[C_SPAN])] = (c[C_PARENT], what)
    below: dict[tuple[str, str], str] = {}  # (trace, span) with a failure below -> what failed
    for (trace, _span), (parent, what) in failed_spans.items():
        for _ in range(64):  # a cycle in bad input cannot loop
            if parent is None:
                break
            key = (trace, parent)
            below.setdefault(key, what)
            parent = failed_spans[key][0] if key in failed_spans else None
    for c in candidates:
        step = matcher.messaging_step(
            c[C_SERVICE], c[C_KIND], c[C_DESTINATION], c[C_GROUP], c[C_OPERATION]
        )
        if step is None:
            continue
        key = (c[C_TRACE], c[C_SPAN])
        own = c[C_STATUS] == STATUS_ERROR
        error = (c[C_STATUS_MSG] or "status ERROR") if own else below.get(key)
        runs.append(
            Run(c[C_TRACE], c[C_SPAN], step, c[C_START], c[C_END], own or key in below, error,
                c[C_CID], not own and key in below)
        )  # fmt: skip
    return runs


def _dt(us: int | None) -> datetime | None:
    return us_to_dt(us) if us is not None else None


def _moved_on(
    old: dict[str, Any], next_step: str | None, next_deadline: datetime | None, now: datetime
) -> bool:
    """Whether a stalled correlation, still in progress after a fold, moved on: the step due
    next is another one, or the same one with a new deadline that has not passed. A step newly
    done is not enough: with spans on several partitions an earlier step's span can arrive after
    the scan stalled the correlation at a later step, and that is no progress at the stalled step
    (one stall, one alert)."""
    if next_step != old.get("next_step"):
        return True
    if next_deadline == old.get("next_deadline"):
        return False
    return next_deadline is None or next_deadline > now


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

    done_at: dict[str, datetime] = {}
    errored: dict[str, datetime] = {}
    last_idx: int | None = None
    mask = 0
    for i, s in enumerate(spec.steps):
        st = steps.get(s.id)
        if st is None:
            continue
        if st["done_at"] is not None:
            done_at[s.id] = us_to_dt(st["done_at"])
            last_idx = i
            mask |= 1 << i
        elif st[_ERROR]:
            errored[s.id] = us_to_dt(st["first_start"])
    last_step: str | None = None
    last_step_at: datetime | None = None
    if last_idx is not None:
        last_step = spec.steps[last_idx].id
        last_step_at = done_at[last_step]
    where = progress(spec, done_at, errored, first_seen)
    failed_step: str | None = None
    failed_at: datetime | None = None
    error: str | None = None
    next_step: str | None = None
    next_deadline: datetime | None = None
    completed_at: datetime | None = None
    if where.completed:
        state = State.COMPLETED.value
        completed_at = max(done_at[s.id] for s in spec.leaves)
    elif where.failed:
        state = State.FAILED.value
        failed_step = where.failed[0]
        st = steps[failed_step]
        failed_at, error = _dt(st["error_at"]), st["last_error"]
    else:
        due = where.next_due if done_at else None
        if due is not None:
            next_step, next_deadline = due.step.id, due.deadline
        old_state = old.get("state")
        moved = old_state == _STALLED and _moved_on(old, next_step, next_deadline, now)
        state = _STALLED if old_state == _STALLED and not moved else State.IN_PROGRESS.value
    old_state = old.get("state")
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
