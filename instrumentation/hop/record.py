"""One record, end to end: the process span, the correlation id, the envelope, the attempts
with backoff, and the one database transaction per attempt (guard -> handler -> effect check +
processed mark), then the emit and the offset commit.

This is the per-record half of :class:`~hoptrace.instrumentation.hop.runtime.HopRuntime` (a
base class of it, using the runtime's state): the runtime's own module keeps the lifecycle,
signals and the consumer loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import Span, SpanKind

from hoptrace.contract import Outcome, PipelineSpec
from hoptrace.contract import conventions as c
from hoptrace.contract.conventions import BAGGAGE_KEY, CORRELATION_HEADER
from hoptrace.ids import is_valid_correlation_id

from ..envelope import Envelope, PoisonRecord, next_event_id
from .context import Abandon, HopContext, RecordInfo
from .lanes import lane_key
from .retry import backoff_s, is_outage, is_retryable

if TYPE_CHECKING:
    from .runtime import HopRuntime

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

#: Where a correlation id may sit in a payload, after the spec's correlation key.
_PAYLOAD_CID_KEY = "correlation_id"


class _HeaderGetter:
    def get(self, carrier: Any, key: str) -> list[str] | None:
        for k, v in carrier:
            if k == key and v is not None:
                return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)]
        return None

    def keys(self, carrier: Any) -> list[str]:
        return [k for k, _ in carrier]


_getter = _HeaderGetter()


def _header(headers: Headers, key: str) -> bytes | None:
    for k, v in headers:
        if k == key:
            return v
    return None


def _payload_cid(envelope: Envelope, spec: PipelineSpec) -> str | None:
    for key in (spec.correlation_key, _PAYLOAD_CID_KEY):
        value = envelope.payload.get(key)
        if value not in (None, ""):
            return str(value)
    return None


@contextlib.contextmanager
def _baggage(cid: str | None) -> Iterator[None]:
    if not cid or baggage.get_baggage(BAGGAGE_KEY) == cid:
        yield
        return
    token = context.attach(baggage.set_baggage(BAGGAGE_KEY, cid))
    try:
        yield
    finally:
        context.detach(token)


class RecordSteps:
    """The per-record methods of :class:`HopRuntime` (see module doc)."""

    async def process(self: HopRuntime, record: ConsumerRecord) -> str:
        """Process one consumed record end to end (span, DB, emit, offset commit); returns the
        outcome (``ok``, ``duplicate``, ``error``)."""
        info = RecordInfo(record.topic, record.partition, record.offset, self.group)
        headers = list(record.headers or ())
        parent = propagate.extract(headers, getter=_getter)
        cid = baggage.get_baggage(BAGGAGE_KEY, parent)
        in_baggage = bool(cid)
        if not cid:
            raw = _header(headers, CORRELATION_HEADER)
            cid = raw.decode("utf-8", "replace") if raw else None
        attrs: dict[str, Any] = {
            c.ATTR_PIPELINE: self.spec.name,
            c.ATTR_STEP: self.step.id,
            c.MSG_SYSTEM: c.MESSAGING_SYSTEM_KAFKA,
            c.MSG_DESTINATION: record.topic,
            c.MSG_PARTITION: str(record.partition),
            c.MSG_OFFSET: record.offset,
            c.MSG_GROUP: self.group,
            c.MSG_OPERATION_TYPE: c.Operation.PROCESS,
        }
        if cid and not in_baggage:  # from baggage, BaggageSpanProcessor sets it at start
            attrs[c.ATTR_CORRELATION_ID] = cid
        if record.key is not None:  # a pipeline keyed by its correlation id finds it here too
            attrs[c.MSG_MESSAGE_KEY] = record.key.decode("utf-8", "replace")
        span = self._tracer.start_span(
            self.step.id, context=parent, kind=SpanKind.CONSUMER, attributes=attrs
        )
        # current = the extracted context (its baggage included) + the process span: the
        # handler's spans are its children and need no second baggage attach
        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            outcome = await self._process_in_span(record, info, headers, span, cid)
            span.set_attribute(c.ATTR_OUTCOME, outcome)
        finally:
            context.detach(token)
            span.end()
        await self._commit(record)
        self.stats[outcome] = self.stats.get(outcome, 0) + 1
        return outcome

    async def _process_in_span(
        self: HopRuntime,
        record: ConsumerRecord,
        info: RecordInfo,
        headers: Headers,
        span: Span,
        cid: str | None,
    ) -> str:
        known = cid  # already on the span
        try:
            envelope = Envelope.parse(record.value)
            cid = cid or envelope.correlation_id or _payload_cid(envelope, self.spec)
            if not cid:
                raise PoisonRecord("no correlation id (baggage, header, envelope and payload)")
            if not is_valid_correlation_id(cid):
                shown = cid if len(cid) <= 60 else f"{cid[:60]}..."
                raise PoisonRecord(f"invalid correlation id {shown!r} (see hoptrace.ids)")
            if envelope.correlation_id != cid:
                envelope = envelope.with_correlation_id(cid)
            if span.is_recording():
                found = {c.ATTR_EVENT_ID: envelope.event_id, c.ATTR_EVENT_TYPE: envelope.type}
                if cid != known:
                    found[c.ATTR_CORRELATION_ID] = cid
                span.set_attributes(found)
            if self.validate is not None:
                try:
                    self.validate(envelope)
                except PoisonRecord:
                    raise
                except Exception as exc:  # a validator that raises anything else: still poison
                    raise PoisonRecord(f"invalid: {type(exc).__name__}: {exc}") from exc
        except PoisonRecord as exc:
            with _baggage(cid):
                await self._dead_letter(record, headers, span, exc.reason, exc, attempts=0)
            return Outcome.ERROR.value
        except Exception as exc:  # noqa: BLE001 - reading a record must never end the worker
            # (its lane would fail, the worker exit and, restarted, read the same record again)
            reason = f"unreadable record: {type(exc).__name__}: {exc}"
            with _baggage(cid if cid and is_valid_correlation_id(cid) else None):
                await self._dead_letter(record, headers, span, reason, exc, attempts=0)
            return Outcome.ERROR.value
        with _baggage(cid):
            return await self._attempts(record, info, headers, span, envelope, cid)

    async def _attempts(
        self: HopRuntime,
        record: ConsumerRecord,
        info: RecordInfo,
        headers: Headers,
        span: Span,
        envelope: Envelope,
        cid: str,
    ) -> str:
        hdrs = {k: v for k, v in headers if v is not None}
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = await self._attempt(envelope, cid, info, span, attempt, hdrs)
                if attempt > 1:  # absent: the first attempt did it
                    span.set_attribute(c.ATTR_ATTEMPTS, attempt)
                return outcome
            except PoisonRecord as exc:
                await self._dead_letter(record, headers, span, exc.reason, exc, attempt)
                return Outcome.ERROR.value
            except Exception as exc:
                span.record_exception(exc, attributes={c.ATTR_ATTEMPT: attempt})
                if not is_retryable(exc):
                    reason = f"non-retryable {type(exc).__name__}: {exc}"
                    log.warning("%s: %s", self.step.id, reason)
                    await self._dead_letter(record, headers, span, reason, exc, attempt)
                    return Outcome.ERROR.value
                if attempt >= self.max_attempts and not is_outage(exc):
                    reason = f"gave up after {attempt} attempts: {type(exc).__name__}: {exc}"
                    log.warning("%s: %s", self.step.id, reason)
                    await self._dead_letter(record, headers, span, reason, exc, attempt)
                    return Outcome.ERROR.value
                self.stats["retries"] += 1
                delay = backoff_s(attempt, self.backoff_s, self.max_backoff_s)
                log.info(
                    "%s: attempt %d failed (%s); retrying in %.2fs",
                    self.step.id,
                    attempt,
                    exc,
                    delay,
                )
                if await self._stop_during(delay):
                    span.set_attribute(c.ATTR_ERROR_REASON, "stopped during retry backoff")
                    raise Abandon() from exc

    async def _attempt(
        self: HopRuntime,
        envelope: Envelope,
        cid: str,
        info: RecordInfo,
        span: Span,
        attempt: int,
        headers: dict[str, bytes],
    ) -> str:
        step = self.step
        next_env: Envelope | None = None
        ctx: HopContext | None = None
        conn = await self._connection()
        # asyncpg's Transaction (a handler may open a savepoint in it); BEGIN/COMMIT spans carry
        # nothing worth their cost. The ledger's guard and mark make no span (unless
        # trace_bookkeeping).
        tx = conn.transaction()
        with suppress_instrumentation():
            await tx.start()
        try:
            duplicate, next_env = await self.ledger.guard(conn, envelope.event_id)
            if not duplicate:
                ctx = HopContext(envelope, cid, info, conn, span, step, self.spec, attempt, headers)
                if self.hooks.before_handle is not None:
                    await self.hooks.before_handle(ctx)
                result = await self.handler(ctx)
                if result is not None:
                    if step.emits:
                        next_env = Envelope(
                            event_id=next_event_id(envelope.event_id, step.id),
                            type=result.type,
                            version=result.version,
                            correlation_id=cid,
                            occurred_at=datetime.now(UTC),
                            payload=result.payload,
                        )
                    elif not self._warned_no_emits:
                        self._warned_no_emits = True
                        log.warning(
                            "%s: handler returned an event but the step emits no topic", step.id
                        )
                await self.ledger.mark(conn, envelope, cid, next_env)
        except BaseException:
            await self._rollback(tx)
            raise
        with suppress_instrumentation():
            await tx.commit()
        if ctx is not None and self.hooks.after_db_commit is not None:
            await self.hooks.after_db_commit(ctx)
        if next_env is not None and step.emits:
            # records topic/partition/offset on the process span
            await self.producer.emit(step.emits, next_env, send_span=self.send_spans)
            if ctx is not None and self.hooks.after_emit is not None:
                await self.hooks.after_emit(ctx)
        return Outcome.DUPLICATE.value if duplicate else Outcome.OK.value

    async def _connection(self: HopRuntime) -> asyncpg.Connection:
        """The current lane's connection (held across records: no pool reset per record)."""
        assert self._pool is not None
        key = lane_key.get()
        conn = self._conns.get(key)
        if conn is not None:
            try:
                closed = conn.is_closed()
            except asyncpg.InterfaceError:  # the pool took it back when its backend went away
                closed = True
            if closed:
                await self._drop_connection()
                conn = None
        if conn is None:
            conn = self._conns[key] = await self._pool.acquire()
        return conn

    async def _drop_connection(self: HopRuntime, key: int | None = None) -> None:
        """Release the current lane's connection (or lane ``key``'s) to the pool."""
        conn = self._conns.pop(lane_key.get() if key is None else key, None)
        if conn is not None and self._pool is not None:
            with suppress_instrumentation(), contextlib.suppress(Exception):
                await self._pool.release(conn, timeout=5)

    async def _rollback(self: HopRuntime, tx: Any) -> None:
        try:
            with suppress_instrumentation():
                await tx.rollback()
        except Exception:  # noqa: BLE001 - a broken connection: get a new one next time
            await self._drop_connection()

    async def _dead_letter(
        self: HopRuntime,
        record: ConsumerRecord,
        headers: Headers,
        span: Span,
        reason: str,
        exc: BaseException,
        attempts: int,
    ) -> None:
        await self.dead_letters.write(record, headers, span, reason, exc, attempts)
        self.stats["dead_lettered"] += 1

    async def _commit(self: HopRuntime, record: ConsumerRecord) -> None:
        """The record is finished: commit its partition's offset (after export; in a lane,
        only past the partition's lowest unfinished record)."""
        tp = TopicPartition(record.topic, record.partition)
        upto: int | None = record.offset + 1
        if lane_key.get() >= 0:  # handled by a lane: records of a partition finish out of order
            upto = self.lanes.finished(tp, record.offset)
            if upto is None:  # an earlier record is still in hand, or the partition was revoked
                return
        await self.commits.commit({tp: upto})
