"""Where a correlation is in its pipeline's DAG: the one rule the collector's correlation state
(ingest: stalls, alerts, funnel) and the diagnosis (lookups) share.

Given which steps are done (some run ended ``ok`` or ``duplicate``) and which have failed runs.
A step with a step below it that ran (done, or with a failed run) counts as passed even without a
run of its own (its span may be lost, or it ran uninstrumented): it was done at the latest when
the first step below it was done or started failing.

* **completed**: every leaf step (a step nothing runs after) is done;
* **frontier**: the steps not passed whose ``after`` steps are all passed (a root: always
  ready) — one per unfinished branch; each is due ``deadline`` after the last of its ``after``
  steps was passed (a root: after the correlation's first sign of life);
* **failed**: a frontier step with a failed run (nothing below it is done, or it would have
  passed);
* **not reached**: the other steps that are not done.

In a linear pipeline the frontier is the one step after the last done step, which is what the
collector has always computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from datetime import datetime

from .spec import PipelineSpec, Step


@dataclass(frozen=True, slots=True)
class Due:
    """A frontier step and when it is due (None: the time it counts from is unknown)."""

    step: Step
    since: datetime | None
    deadline: datetime | None


@dataclass(frozen=True, slots=True)
class Progress:
    completed: bool
    frontier: tuple[Due, ...]  # in spec order
    failed: tuple[str, ...]  # frontier steps with a failed run, in spec order
    not_reached: tuple[str, ...]

    @property
    def next_due(self) -> Due | None:
        """The frontier step due first (ties: spec order), failed steps excluded."""
        waiting = [d for d in self.frontier if d.step.id not in self.failed]
        timed = [d for d in waiting if d.deadline is not None]
        if timed:
            return min(timed, key=lambda d: d.deadline)  # type: ignore[arg-type,return-value]
        return waiting[0] if waiting else None


def descendants(spec: PipelineSpec, step_id: str) -> set[str]:
    """Every step that runs (directly or not) after ``step_id``."""
    out: set[str] = set()
    todo = [step_id]
    while todo:
        sid = todo.pop()
        for child in spec.children(sid):
            if child.id not in out:
                out.add(child.id)
                todo.append(child.id)
    return out


def progress(
    spec: PipelineSpec,
    done_at: Mapping[str, datetime],
    errored: Set[str] | Mapping[str, datetime],
    started: datetime | None,
) -> Progress:
    """The correlation's progress. ``done_at``: done steps and when they were done (earliest
    successful end); ``errored``: steps with a failed run that are not done (a mapping gives when
    each first ran: a step below that failed still proves its parents passed); ``started``: the
    correlation's first sign of life (what a root step's deadline counts from)."""
    leaves_done = all(s.id in done_at for s in spec.leaves)
    ran = dict(errored) if isinstance(errored, Mapping) else {}
    passed = dict(done_at)  # step -> when it was done at the latest
    for step in reversed(spec.steps):  # children before parents
        below = [
            t
            for c in spec.children(step.id)
            for t in (passed.get(c.id), None if c.id in done_at else ran.get(c.id))
            if t is not None
        ]
        if step.id not in passed and below:
            passed[step.id] = min(below)
    frontier: list[Due] = []
    failed: list[str] = []
    not_reached: list[str] = []
    for step in spec.steps:
        if step.id in passed:
            continue
        if all(p in passed for p in step.after):
            since = max((passed[p] for p in step.after), default=started)
            frontier.append(Due(step, since, since + step.deadline if since else None))
            if step.id in errored:
                failed.append(step.id)
        else:
            not_reached.append(step.id)
    return Progress(leaves_done, tuple(frontier), tuple(failed), tuple(not_reached))


def branch_heads(spec: PipelineSpec, done: Set[str]) -> tuple[str, ...]:
    """Where each unfinished branch stopped, for a diagnosis: the steps not done whose ``after``
    steps are all done, leaving out a step below another such step (it waits behind it). The
    first of them, in spec order, is the first step that is not done whenever a root is done."""
    heads: list[str] = []
    blocked: set[str] = set()
    for step in spec.steps:
        if step.id in done:
            continue
        if step.id not in blocked and all(p in done for p in step.after):
            heads.append(step.id)
        blocked |= {step.id} | descendants(spec, step.id)
    return tuple(heads)
