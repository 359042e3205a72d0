"""One ``hoptrace redrive`` run: the correlations asked for (ids, or the stuck ones from the
store, filtered by step, cause and age), each diagnosed, planned and, with ``apply``, redriven;
and the report of what was and was not done.

Each correlation is handled under a PostgreSQL advisory lock on its id, so two redrives of one
payment (two operators, the CLI and the dashboard) take turns: the second sees the first's audit
row and sends nothing while that record is in flight.
"""

from __future__ import annotations

import asyncio
import getpass
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from hoptrace.collector import api
from hoptrace.contract import CAUSES, Cause, PipelineSpec, RedriveResult, load_spec
from hoptrace.instrumentation.producer import HopProducer
from hoptrace.instrumentation.tracing import configure_tracing, flush_tracing
from hoptrace.settings import RedriveSettings, Settings, get_settings

from . import apply, audit
from .plan import Action, Kind, plan
from .sources import Sources

#: The redrive's spans come from this service.
SERVICE_NAME = "hoptrace-redrive"
#: Correlations redriven at once (``--stuck``).
CONCURRENCY = 8
#: Report format version (``--format json``).
REPORT_VERSION = 1


class BadInput(ValueError):
    """What was asked cannot be done as asked (exit 2); the message says why."""


@dataclass
class PaymentReport:
    """One correlation: its diagnosis in brief, the planned actions and what applying did."""

    correlation_id: str
    found: bool = True
    state: str | None = None
    cause: str | None = None
    stopped_at: str | None = None
    actions: list[Action] = field(default_factory=list)
    applied: list[apply.Applied] = field(default_factory=list)
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or any(not a.ok for a in self.applied)

    @property
    def refused(self) -> bool:
        return any(a.kind == Kind.REFUSE for a in self.actions)


@dataclass
class Report:
    """The run: dry run or applied, one entry per correlation."""

    applied: bool
    payments: list[PaymentReport] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: everything asked done or nothing to do; 1: something failed or was refused."""
        return 1 if any(p.failed or p.refused for p in self.payments) else 0

    def counts(self) -> dict[str, int]:
        out = {"payments": len(self.payments), RedriveResult.SENT.value: 0, "would_send": 0}
        out |= {"nothing_to_do": 0, RedriveResult.REFUSED.value: 0, RedriveResult.FAILED.value: 0}
        for p in self.payments:
            if p.error is not None:
                out[RedriveResult.FAILED] += 1
            for a in p.actions:
                if a.kind == Kind.REFUSE:
                    out[RedriveResult.REFUSED] += 1
                elif not a.kind.sends:
                    out["nothing_to_do"] += 1
                elif not self.applied:
                    out["would_send"] += 1
            for r in p.applied:
                if r.result == RedriveResult.SENT:
                    out[RedriveResult.SENT] += 1
                elif r.result == RedriveResult.FAILED:
                    out[RedriveResult.FAILED] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "applied": self.applied,
            "summary": self.counts(),
            "exit_code": self.exit_code,
            "payments": [_payment_dict(p) for p in self.payments],
        }


def _action_dict(a: Action, r: apply.Applied | None) -> dict[str, Any]:
    return {
        "step": a.step,
        "cause": a.cause,
        "kind": a.kind.value,
        "sends": a.kind.sends,
        "description": a.describe(),
        "record_from": a.record.where if a.record else None,
        "event_id": a.record.event_id if a.record else None,
        "to_topic": a.topic if a.kind.sends else None,
        "removes_mark": str(a.remove_mark) if a.remove_mark else None,
        "origin_trace_ids": list(a.origin_traces),
        "result": r.result if r else None,
        "audit_id": r.audit_id if r else None,
        "sent": (
            {"topic": r.sent[0], "partition": r.sent[1], "offset": r.sent[2]}
            if r and r.sent
            else None
        ),
        "trace_id": r.trace_id if r else None,
        "detail": r.detail if r else None,
    }


def _payment_dict(p: PaymentReport) -> dict[str, Any]:
    done = {id(r.action): r for r in p.applied}
    return {
        "correlation_id": p.correlation_id,
        "found": p.found,
        "state": p.state,
        "cause": p.cause,
        "stopped_at": p.stopped_at,
        "error": p.error,
        "actions": [_action_dict(a, done.get(id(a))) for a in p.actions],
    }


def default_who() -> str:
    """Who runs the redrive: ``HOPTRACE_REDRIVE_WHO``, else the login name."""
    who = RedriveSettings().redrive_who
    if who:
        return who
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class Ask:
    """What to redrive: ids, or the stuck correlations (``--stuck``) with filters."""

    ids: tuple[str, ...] = ()
    stuck: bool = False
    step: str | None = None
    cause: str | None = None
    since: timedelta | None = None
    limit: int = 100

    def check(self, spec: PipelineSpec) -> None:
        """Raise :class:`BadInput` for an ask that cannot be carried out as asked."""
        if bool(self.ids) == self.stuck:
            raise BadInput("give one payment id, or --stuck (not both)")
        for cid in self.ids:
            try:
                api.validate_id(cid)
            except api.MalformedId as exc:
                raise BadInput(str(exc)) from None
        if self.step is not None and not spec.has_step(self.step):
            steps = ", ".join(s.id for s in spec.steps)
            raise BadInput(f"unknown step {self.step!r}: one of {steps}")
        if self.cause is not None and self.cause not in CAUSES:
            raise BadInput(f"unknown cause {self.cause!r}: one of {', '.join(CAUSES)}")
        if self.limit < 1:
            raise BadInput("--limit must be at least 1")
        if not self.stuck and (self.step or self.cause or self.since):
            raise BadInput("--step, --cause and --since go with --stuck")


async def _stuck(pool: asyncpg.Pool, ask: Ask) -> list[str]:
    """Stuck (stalled and failed) correlation ids from the store, filtered, at most ``limit``
    (the cause filter is applied after each diagnosis)."""
    rows = await api.stalled(pool, limit=max(ask.limit * 4, 500), failed=True)
    now = datetime.now(UTC)
    out: list[str] = []
    for r in rows:
        if ask.step and r.step != ask.step:
            continue
        if ask.since and r.since < now - ask.since:
            continue
        out.append(r.correlation_id)
    return out[: ask.limit] if not ask.cause else out


class LazyProducer:
    """The producer, started when the first record is sent (a run that sends nothing, e.g.
    with Kafka unreadable and every payment refused, needs none)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer: HopProducer | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> HopProducer:
        async with self._lock:
            if self._producer is None:
                producer = HopProducer(self.bootstrap)
                await producer.start()
                self._producer = producer
        return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()


async def _one(
    cid: str,
    ask: Ask,
    spec: PipelineSpec,
    settings: Settings,
    pool: asyncpg.Pool,
    sources: Sources,
    producer: LazyProducer | None,
    who: str,
) -> PaymentReport | None:
    """Diagnose, plan and (with a producer) apply for one correlation, under its lock. None:
    filtered out by ``--cause``."""
    rep = PaymentReport(cid)
    async with pool.acquire() as lock:
        await lock.execute("SELECT pg_advisory_lock(hashtext('hoptrace.redrive:' || $1))", cid)
        try:
            d = await api.diagnose(cid, settings=settings, spec=spec)
            rep.found, rep.state, rep.cause, rep.stopped_at = (
                d.found,
                d.state,
                d.cause,
                d.stopped_at,
            )
            if ask.cause and d.cause != ask.cause:
                return None
            if not d.found:
                rep.error = f"no span, processed mark or effect row carries {cid}"
                return rep
            found = {}
            if d.stopped_at and d.cause != Cause.COMPLETED and not d.missing:
                for sid in d.stopped_at_all or (d.stopped_at,):
                    found[sid] = await sources.find(d, sid)
            rep.actions = plan(spec, d, found)
            if producer is not None:
                for a in rep.actions:
                    if a.kind.sends:
                        sender = await producer.get()
                        rep.applied.append(await apply.send(pool, sender, a, who))
                    else:
                        rep.applied.append(await apply.record_only(pool, a, who))
        except Exception as exc:  # noqa: BLE001 - reported per payment, the others go on
            rep.error = f"{type(exc).__name__}: {exc}"
        finally:
            await lock.execute(
                "SELECT pg_advisory_unlock(hashtext('hoptrace.redrive:' || $1))", cid
            )
    return rep


async def run(
    ask: Ask,
    *,
    apply_: bool = False,
    who: str | None = None,
    settings: Settings | None = None,
    spec: PipelineSpec | None = None,
    tracing: bool = True,
    close_api: bool = True,
) -> Report:
    """Carry out ``ask``: a dry run, or with ``apply_`` the redrive itself. ``close_api``:
    close the collector API's clients of this event loop at the end (not in a process that
    keeps using them, e.g. the collector serving the redrive route)."""
    settings = settings or get_settings()
    spec = spec or load_spec(settings.pipeline)
    ask.check(spec)
    who = who or default_who()
    report = Report(applied=apply_)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=CONCURRENCY + 6)
    try:
        if apply_:
            await audit.ensure(pool)
            if tracing:
                configure_tracing(SERVICE_NAME, instrument=False)
        ids = list(ask.ids) if ask.ids else await _stuck(pool, ask)
        async with Sources(spec, pool, settings) as sources:
            producer = LazyProducer(settings.kafka_bootstrap) if apply_ else None
            try:
                sem = asyncio.Semaphore(CONCURRENCY)

                async def one(cid: str) -> PaymentReport | None:
                    async with sem:
                        return await _one(cid, ask, spec, settings, pool, sources, producer, who)

                done = await asyncio.gather(*(one(cid) for cid in ids))
            finally:
                if producer is not None:
                    await producer.stop()
        report.payments = [p for p in done if p is not None][: ask.limit]
        if apply_ and tracing:
            await asyncio.to_thread(flush_tracing, 5.0)
    finally:
        if close_api:
            await api.close()
        await pool.close()
    return report
