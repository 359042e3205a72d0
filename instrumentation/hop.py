"""The hop runtime: a worker registers a handler for its step; the runtime does the rest.

Per record: consume (manual commits) -> one process span named after the step, child of the
context in the record's headers -> correlation id from baggage, else header, else payload, else
poison -> parse the envelope (poison -> ``<topic>.dlq`` at once) -> ONE database transaction:
idempotency claim in ``processed_events`` (already there -> ``duplicate``: no handler call, the
stored next event is re-emitted), the handler's writes, the effect check, the processed mark with
the next event -> emit the next event (deterministic event id) -> commit the offset.
Retryable failures back off and retry; after the last attempt the record is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import signal
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import asyncpg.pool
import httpx
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
)
from aiokafka.structs import ConsumerRecord
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from hoptrace.contract import Outcome, PipelineSpec, Step
from hoptrace.contract import conventions as c
from hoptrace.contract.conventions import BAGGAGE_KEY, CORRELATION_HEADER
from hoptrace.ids import is_valid_correlation_id

from .envelope import (
    MAX_RECORD_BYTES,
    Envelope,
    PoisonRecord,
    RetryableError,
    next_event_id,
)
from .producer import HopProducer
from .tracing import flush_tracing, get_tracer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RecordInfo:
    """Where the record in hand came from."""

    topic: str
    partition: int
    offset: int
    group: str


@dataclass(slots=True)
class Emit:
    """What a handler returns: the next event (type, payload, version)."""

    type: str
    payload: dict[str, Any]
    version: int = 1


@dataclass(slots=True)
class HopContext:
    """Given to a handler. ``conn`` is inside the open transaction where the handler writes its
    rows (the processed mark is written in the same transaction after the effect check)."""

    envelope: Envelope
    correlation_id: str
    record: RecordInfo
    conn: asyncpg.Connection
    span: Span
    step: Step
    spec: PipelineSpec
    attempt: int = 1
    headers: dict[str, bytes] = field(default_factory=dict)


Handler = Callable[[HopContext], Awaitable[Emit | None]]
EffectCheck = Callable[[asyncpg.Connection, Envelope], Awaitable[bool]]
Hook = Callable[[HopContext], Awaitable[None]]


@dataclass(slots=True)
class HopHooks:
    """Failure-injection points (tests and fault switches). Each is awaited with the context.

    ``before_handle``: inside the transaction, before the handler (e.g. ``slow``).
    ``after_db_commit``: after the transaction committed, before the emit and the offset commit
    (e.g. ``crash-after-write``: raise or ``os._exit``). ``after_emit``: after the next event was
    acknowledged, before the offset commit."""

    before_handle: Hook | None = None
    after_db_commit: Hook | None = None
    after_emit: Hook | None = None


class EffectMissing(RetryableError):
    """The step's effect row is not there after the handler ran: roll back, do not mark."""


PROCESSED_EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS processed_events (
    event_id       text PRIMARY KEY,
    event_type     text NOT NULL,
    correlation_id text NOT NULL,
    source         text NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    emitted        jsonb
);
CREATE INDEX IF NOT EXISTS processed_events_correlation_id_idx
    ON processed_events (correlation_id);
"""


async def ensure_processed_events(conn: asyncpg.Connection) -> None:
    """Create the idempotency table ``processed_events`` (and its correlation index) if missing.
    ``source`` is the step id that processed the event; ``emitted`` the next event it emitted."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('hoptrace.processed_events'))")
        await conn.execute(PROCESSED_EVENTS_DDL)


def _untraced(conn: Any, name: str) -> Callable[..., Awaitable[Any]]:
    """Connection method ``name`` of ``conn`` (a pool's proxy or a connection) without the
    asyncpg instrumentation's wrapper (wrapt keeps the original function as ``__wrapped__``):
    no span and none of the wrapper's per-call work."""
    raw = conn._con if isinstance(conn, asyncpg.pool.PoolConnectionProxy) else conn
    if not isinstance(raw, asyncpg.Connection):  # released proxy, or not asyncpg's
        return getattr(conn, name)
    method = getattr(type(raw), name)
    return functools.partial(getattr(method, "__wrapped__", method), raw)


def _quote_ident(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def default_effect_check(table: str, column: str = "correlation_id") -> EffectCheck:
    """``SELECT 1 FROM <table> WHERE <column> = $1`` with the envelope's correlation id."""
    sql = f"SELECT 1 FROM {_quote_ident(table)} WHERE {_quote_ident(column)} = $1 LIMIT 1"  # noqa: S608

    async def check(conn: asyncpg.Connection, envelope: Envelope) -> bool:
        return await conn.fetchval(sql, envelope.correlation_id) is not None

    return check


_GUARD_SQL = "SELECT emitted FROM processed_events WHERE event_id = $1"
_MARK_SQL = (
    "INSERT INTO processed_events (event_id, event_type, correlation_id, source, emitted)"
    " VALUES ($1, $2, $3, $4, $5::jsonb)"
)


def _mark_with_effect_sql(table: str, column: str) -> str:
    """Insert the processed mark only if the effect row exists (one round trip)."""
    return (
        "INSERT INTO processed_events (event_id, event_type, correlation_id, source, emitted)"  # noqa: S608
        " SELECT $1, $2, $3, $4, $5::jsonb WHERE EXISTS (SELECT 1 FROM"
        f" {_quote_ident(table)} WHERE {_quote_ident(column)} = $3) RETURNING 1"
    )


#: Offsets wait at most this long for their spans to be exported (then they are committed).
UNFLUSHED_COMMIT_S = 120.0

_RETRYABLE_SQLSTATE_CLASSES = ("08", "40", "53", "55", "57", "58")


def is_retryable(exc: BaseException) -> bool:
    """RetryableError, connection/DB-availability errors, httpx errors, Kafka errors, timeouts."""
    if isinstance(exc, RetryableError | httpx.HTTPError | KafkaError | OSError | TimeoutError):
        return True
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return True  # InternalClientError: used while still consuming a terminated backend's error
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state == "23505" and getattr(exc, "table_name", None) == "processed_events":
            return True  # another consumer marked it meanwhile: the retry sees a duplicate
        return state[:2] in _RETRYABLE_SQLSTATE_CLASSES
    return False


def is_outage(exc: BaseException) -> bool:
    """A dependency is unreachable (database down or restarting, broker unreachable, a
    downstream service refusing connections): retried until it is back, attempts not used up,
    so an outage never dead-letters (loses) a healthy record. Follows ``raise ... from``."""
    if exc.__cause__ is not None and exc.__cause__ is not exc and is_outage(exc.__cause__):
        return True
    if isinstance(
        exc,
        OSError
        | httpx.ConnectError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | KafkaConnectionError
        | KafkaTimeoutError
        | NodeNotReadyError,
    ):
        return True
    state = getattr(exc, "sqlstate", "") or "" if isinstance(exc, asyncpg.PostgresError) else ""
    return state[:2] == "08" or state in ("57P01", "57P02", "57P03")


class _HeaderGetter:
    def get(self, carrier: Any, key: str) -> list[str] | None:
        for k, v in carrier:
            if k == key and v is not None:
                return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)]
        return None

    def keys(self, carrier: Any) -> list[str]:
        return [k for k, _ in carrier]


_getter = _HeaderGetter()


class _Assigned(ConsumerRebalanceListener):
    def __init__(self, runtime: HopRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.runtime._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.runtime.assigned = set(assigned)
        self.runtime.ready.set()


#: The lane (see ``HopRuntime._loop``) the running task works for: its DB connection slot.
_lane_key: contextvars.ContextVar[int] = contextvars.ContextVar("hoptrace_hop_lane", default=-1)


class _Lane:
    """Records of some keys (correlation ids), handled one at a time in offset order by one
    task with its own database connection. Lanes run concurrently; one key is never in two
    lanes, so the records of one key keep their order."""

    __slots__ = ("key", "queue", "task", "current")

    def __init__(self, key: int) -> None:
        self.key = key
        self.queue: deque[ConsumerRecord] = deque()
        self.task: asyncio.Task[None] | None = None
        self.current: ConsumerRecord | None = None


def _slot(key: bytes | None, partition: int, lanes: int) -> int:
    """The lane of a record: one key, one lane, so a correlation's records stay in order
    (a record without a key: its partition's lane)."""
    return (zlib.crc32(key) if key is not None else partition) % lanes


class _Watermark:
    """A partition's records handed to lanes, in offset order: the offset to commit is the
    one after the longest run of finished records from the start (a kill redelivers the rest)."""

    __slots__ = ("started_", "done")

    def __init__(self) -> None:
        self.started_: deque[int] = deque()
        self.done: set[int] = set()

    def started(self, offset: int) -> None:
        self.started_.append(offset)

    def finished(self, offset: int) -> int | None:
        """Record ``offset`` is finished; returns the new offset to commit, if it moved."""
        self.done.add(offset)
        upto = None
        while self.started_ and self.started_[0] in self.done:
            first = self.started_.popleft()
            self.done.discard(first)
            upto = first + 1
        return upto


class _Abandon(Exception):
    """Stop requested while the record in hand could not be finished: leave it uncommitted."""


# One signal handler for all runtimes running in this process.
_running: set[HopRuntime] = set()


def _on_signal() -> None:
    for rt in list(_running):
        rt.request_stop()


@dataclass(frozen=True, slots=True)
class HopOptions:
    """How a :class:`HopRuntime` runs (everything but its collaborators).

    ``group`` overrides the spec's group (to reproduce the wrong-group fault);
    ``verify_effect=False`` ONLY reproduces the legacy mark-before-verify bug;
    ``receive_spans=True`` keeps the aiokafka instrumentation's per-record receive span (off by
    default: the process span is the child of the same extracted context and carries the same
    messaging attributes); ``send_spans=True`` keeps the aiokafka send span of the emit (off by
    default: the process span records the emitted record's topic/partition/offset and is the
    next hop's parent, through traceparent + baggage in the record's headers);
    ``trace_bookkeeping=True`` traces the runtime's own guard/mark queries too (the handler's
    queries are always traced); ``commit_after_export=True`` (the default) commits offsets every
    ``commit_interval_s`` after exporting the spans of the records handled, so a SIGKILL never
    leaves a committed record without its step span. Records of different keys are handled
    concurrently, in up to ``max_lanes`` lanes (a key always in the same lane, in offset order;
    each lane with its own connection); a partition with ``lane_buffer`` records waiting is
    paused until its lanes catch up."""

    bootstrap: str
    database_url: str
    group: str | None = None
    verify_effect: bool = True
    max_attempts: int = 5
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    auto_offset_reset: str = "earliest"
    handle_signals: bool = True
    consumer_opts: Mapping[str, Any] = field(default_factory=dict)
    flush_timeout_s: float = 5.0
    receive_spans: bool = False
    send_spans: bool = False
    trace_bookkeeping: bool = False
    commit_after_export: bool = True
    commit_interval_s: float = 0.2
    max_lanes: int = 8
    lane_buffer: int = 200

    def replace(self, **changes: Any) -> HopOptions:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


class HopRuntime:
    """Consume a step's topic and run ``handler`` per record with tracing, idempotency, effect
    verification, retries, dead-lettering and manual offset commits (see :class:`HopOptions`).

    ``effect_check`` defaults to ``SELECT 1 FROM <step.table> WHERE <step.correlation_column> =
    $1``; ``validate`` raises PoisonRecord for a wrong type/version/schema; ``hooks`` are the
    failure-injection points; ``producer`` a shared :class:`HopProducer` (default: its own).
    A partition's offset is committed only past records all handled (its lowest unfinished one
    holds it)."""

    def __init__(
        self,
        spec: PipelineSpec,
        step_id: str,
        handler: Handler,
        options: HopOptions,
        *,
        producer: HopProducer | None = None,
        hooks: HopHooks | None = None,
        effect_check: EffectCheck | None = None,
        validate: Callable[[Envelope], None] | None = None,
    ) -> None:
        self.spec = spec
        self.options = o = options
        self.step = spec.step(step_id)
        if not self.step.consumes:
            raise ValueError(f"step {step_id!r} consumes no topic; use step_span + HopProducer")
        self.group = o.group or self.step.group or step_id
        self.handler = handler
        self.bootstrap = o.bootstrap
        self.database_url = o.database_url
        self.verify_effect = o.verify_effect
        self._mark_with_effect_sql: str | None = None
        column = self.step.correlation_column
        if effect_check is None and self.step.table:
            effect_check = default_effect_check(self.step.table, column)
            self._mark_with_effect_sql = _mark_with_effect_sql(self.step.table, column)
        self.effect_check = effect_check
        self.validate = validate
        self.max_attempts = max(1, o.max_attempts)
        self.backoff_s = o.backoff_s
        self.max_backoff_s = o.max_backoff_s
        self.hooks = hooks or HopHooks()
        self.auto_offset_reset = o.auto_offset_reset
        self.handle_signals = o.handle_signals
        self.consumer_opts = dict(o.consumer_opts)
        self.flush_timeout_s = o.flush_timeout_s
        self.receive_spans = o.receive_spans
        self.send_spans = o.send_spans
        self.trace_bookkeeping = o.trace_bookkeeping
        self.commit_after_export = o.commit_after_export
        self.commit_interval_s = o.commit_interval_s
        self.max_lanes = max(1, o.max_lanes)
        self.lane_buffer = max(1, o.lane_buffer)
        self._lanes: dict[int, _Lane] = {}
        self._paused: set[TopicPartition] = set()
        self._waiting: dict[TopicPartition, int] = {}  # records queued or in hand
        self._marks: dict[TopicPartition, _Watermark] = {}
        self._conns: dict[int, asyncpg.Connection] = {}
        self._lane_failed = asyncio.Event()
        self._pending: dict[TopicPartition, int] = {}
        self._committer: asyncio.Task[None] | None = None
        self._unflushed_since: float | None = None
        self._own_producer = producer is None
        self.producer = producer or HopProducer(o.bootstrap)
        self.ready = asyncio.Event()
        self.assigned: set[TopicPartition] = set()
        self.stats: dict[str, int] = {
            "ok": 0,
            "duplicate": 0,
            "error": 0,
            "dead_lettered": 0,
            "retries": 0,
        }
        self._stop = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._pool: asyncpg.Pool | None = None
        self._tracer = get_tracer()
        self._warned_no_emits = False

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask ``run()`` to finish the record in hand, commit, flush and return (signal-safe)."""
        self._stop.set()

    async def stop(self) -> None:
        """Same as ``request_stop`` (awaitable for symmetry)."""
        self.request_stop()

    async def run(self) -> None:
        """Consume until ``stop()`` / SIGTERM / SIGINT; then finish the record in hand, commit
        its offset, close the clients and flush spans."""
        self._tracer = get_tracer()  # tracing may have been configured after __init__
        self._pool = await asyncpg.create_pool(
            self.database_url, min_size=1, max_size=self.max_lanes + 1
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            **self.consumer_opts,
        )
        installed = False
        try:
            async with self._pool.acquire() as conn:
                await ensure_processed_events(conn)
            await self.producer.start()
            self._consumer.subscribe([self.step.consumes], listener=_Assigned(self))
            await self._consumer.start()
            if self.commit_after_export:
                self._committer = asyncio.create_task(self._commit_loop())
            installed = self._install_signals()
            await self._loop()
        finally:
            if installed:
                self._remove_signals()
            if self._committer is not None:
                self._committer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._committer
                self._committer = None
                with contextlib.suppress(Exception):
                    await self._commit_pending()
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            if self._own_producer:
                with contextlib.suppress(Exception):
                    await self.producer.stop()
            for key in list(self._conns):
                await self._drop_connection(key)
            with contextlib.suppress(Exception):
                await self._pool.close()
            await asyncio.to_thread(flush_tracing, self.flush_timeout_s)

    def _install_signals(self) -> bool:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return False
        loop = asyncio.get_running_loop()
        if not _running:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, _on_signal)
        _running.add(self)
        return True

    def _remove_signals(self) -> None:
        _running.discard(self)
        if not _running:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    async def _loop(self) -> None:
        """Fetch batches and hand each record to its partition's lane; lanes run concurrently.
        Returns when stop is requested (after the lanes finished the records in hand)."""
        assert self._consumer is not None
        consumer = self._consumer
        getmany = consumer.getmany
        plain = getattr(AIOKafkaConsumer.getmany, "__wrapped__", None)
        if not self.receive_spans and plain is not None:
            # The process span (child of the same extracted context) carries everything the
            # instrumentation's receive span would; skip that one to halve the per-hop cost.
            def getmany(*args: Any, **kwargs: Any) -> Any:
                return plain(consumer, *args, **kwargs)

        stop_wait = asyncio.ensure_future(self._stop.wait())
        failed_wait = asyncio.ensure_future(self._lane_failed.wait())
        try:
            while not self._stop.is_set():
                get = asyncio.ensure_future(getmany(timeout_ms=1000, max_records=self.lane_buffer))
                done, _ = await asyncio.wait(
                    {get, stop_wait, failed_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await get
                    break
                for tp, records in get.result().items():
                    if records:
                        self._dispatch(tp, records)
            self._stop.set()  # lanes finish the record in hand and leave the rest
            lanes = [lane.task for lane in self._lanes.values() if lane.task is not None]
            if lanes:
                await asyncio.gather(*lanes, return_exceptions=True)
            for lane in self._lanes.values():  # a lane that failed ends the runtime with it
                if lane.task is not None and lane.task.done() and not lane.task.cancelled():
                    exc = lane.task.exception()
                    if exc is not None:
                        raise exc
        finally:
            stop_wait.cancel()
            failed_wait.cancel()
            for lane in self._lanes.values():  # cancelled: the lanes go with the loop
                if lane.task is not None and not lane.task.done():
                    lane.task.cancel()

    def _dispatch(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        mark = self._marks.get(tp)
        if mark is None:
            mark = self._marks[tp] = _Watermark()
        for record in records:
            mark.started(record.offset)
            slot = _slot(record.key, tp.partition, self.max_lanes)
            lane = self._lanes.get(slot)
            if lane is None:
                lane = self._lanes[slot] = _Lane(slot)
            lane.queue.append(record)
            if lane.task is None or lane.task.done():
                lane.task = asyncio.create_task(self._run_lane(lane), name=f"hop-lane-{slot}")
                lane.task.add_done_callback(self._lane_done)
        waiting = self._waiting[tp] = self._waiting.get(tp, 0) + len(records)
        if waiting >= self.lane_buffer:
            # back-pressure: fetch no more of it until its lanes caught up (see _run_lane)
            self._consumer.pause(tp)  # type: ignore[union-attr]
            self._paused.add(tp)

    def _lane_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._lane_failed.set()

    async def _run_lane(self, lane: _Lane) -> None:
        _lane_key.set(lane.key)  # this task's context only: the lane's DB connection slot
        queue = lane.queue
        while queue and not self._stop.is_set():
            record = lane.current = queue.popleft()
            try:
                await self.process(record)
            except _Abandon:
                log.info(
                    "stop requested: left %s:%s@%s uncommitted",
                    record.topic,
                    record.partition,
                    record.offset,
                )
                return
            finally:
                lane.current = None
                tp = TopicPartition(record.topic, record.partition)
                left = self._waiting[tp] = self._waiting.get(tp, 1) - 1
            if tp in self._paused and left <= self.lane_buffer // 2:
                self._paused.discard(tp)
                if self._consumer is not None and tp in self.assigned:
                    self._consumer.resume(tp)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Partitions taken away: drop their waiting records (their new owner gets them from
        the committed offset), wait briefly for a record of theirs in hand, commit what was
        handled while the offsets are still ours."""
        parts = {tp.partition for tp in revoked}
        busy = []
        for lane in self._lanes.values():
            kept = [r for r in lane.queue if r.partition not in parts]
            if len(kept) != len(lane.queue):
                lane.queue.clear()
                lane.queue.extend(kept)
            if lane.current is not None and lane.current.partition in parts and lane.task:
                busy.append(lane.task)
        self._paused -= revoked
        if busy:
            await asyncio.wait(busy, timeout=10)
        for tp in revoked:  # records of theirs still in hand after this are not committed
            self._marks.pop(tp, None)
            self._waiting.pop(tp, None)
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await self._commit_pending()

    # -- one record --------------------------------------------------------------------------

    async def process(self, record: ConsumerRecord) -> str:
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
        self,
        record: ConsumerRecord,
        info: RecordInfo,
        headers: list[tuple[str, bytes]],
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
        with _baggage(cid):
            return await self._attempts(record, info, headers, span, envelope, cid)

    async def _attempts(
        self,
        record: ConsumerRecord,
        info: RecordInfo,
        headers: list[tuple[str, bytes]],
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
                delay = min(self.max_backoff_s, self.backoff_s * (2 ** (min(attempt, 30) - 1)))
                log.info(
                    "%s: attempt %d failed (%s); retrying in %.2fs",
                    self.step.id,
                    attempt,
                    exc,
                    delay,
                )
                if await self._stop_during(delay):
                    span.set_attribute(c.ATTR_ERROR_REASON, "stopped during retry backoff")
                    raise _Abandon() from exc

    async def _attempt(
        self,
        envelope: Envelope,
        cid: str,
        info: RecordInfo,
        span: Span,
        attempt: int,
        headers: dict[str, bytes],
    ) -> str:
        step = self.step
        duplicate = False
        next_env: Envelope | None = None
        ctx: HopContext | None = None
        conn = await self._connection()
        # asyncpg's Transaction (a handler may open a savepoint in it); BEGIN/COMMIT spans carry
        # nothing worth their cost. The guard and mark go around the asyncpg instrumentation
        # (unless trace_bookkeeping): no span and none of its wrapper's work.
        tx = conn.transaction()
        with suppress_instrumentation():
            await tx.start()
        try:
            row = await self._own(conn, "fetchrow")(_GUARD_SQL, envelope.event_id)
            if row is not None:
                duplicate = True
                if row["emitted"] is not None:
                    next_env = Envelope.model_validate_json(row["emitted"])
            else:
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
                await self._mark(conn, envelope, cid, next_env)
        except BaseException:
            await self._rollback(conn, tx)
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

    async def _mark(
        self, conn: asyncpg.Connection, envelope: Envelope, cid: str, next_env: Envelope | None
    ) -> None:
        """Effect check + processed mark (one statement for the default check)."""
        emitted = next_env.model_dump_json() if next_env is not None else None
        args = (envelope.event_id, envelope.type, cid, self.step.id, emitted)
        verify = self.verify_effect and self.effect_check is not None
        if verify and self._mark_with_effect_sql is not None:
            if await self._own(conn, "fetchval")(self._mark_with_effect_sql, *args) is None:
                raise EffectMissing(
                    f"effect missing: no row in {self.step.table!r} for correlation {cid!r}"
                )
            return
        if verify:
            with self._bookkeeping():  # a custom check's statements are bookkeeping too
                if not await self.effect_check(conn, envelope):  # type: ignore[misc]
                    raise EffectMissing(
                        f"effect missing: the effect check for correlation {cid!r} failed"
                    )
        await self._own(conn, "execute")(_MARK_SQL, *args)

    def _own(self, conn: asyncpg.Connection, name: str) -> Callable[..., Awaitable[Any]]:
        """A connection method for the runtime's own statements (traced only when asked)."""
        return getattr(conn, name) if self.trace_bookkeeping else _untraced(conn, name)

    def _bookkeeping(self) -> contextlib.AbstractContextManager[object]:
        """The runtime's own queries (guard, effect check, mark) are not traced unless asked
        for (``trace_bookkeeping=True``): the process span's outcome says what they found."""
        if self.trace_bookkeeping:
            return contextlib.nullcontext()
        return suppress_instrumentation()

    async def _connection(self) -> asyncpg.Connection:
        """The current lane's connection (held across records: no pool reset per record)."""
        assert self._pool is not None
        key = _lane_key.get()
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

    async def _drop_connection(self, key: int | None = None) -> None:
        """Release the current lane's connection (or lane ``key``'s) to the pool."""
        conn = self._conns.pop(_lane_key.get() if key is None else key, None)
        if conn is not None and self._pool is not None:
            with suppress_instrumentation(), contextlib.suppress(Exception):
                await self._pool.release(conn, timeout=5)

    async def _rollback(self, conn: asyncpg.Connection, tx: Any) -> None:
        try:
            with suppress_instrumentation():
                await tx.rollback()
        except Exception:  # noqa: BLE001 - a broken connection: get a new one next time
            await self._drop_connection()

    async def _dead_letter(
        self,
        record: ConsumerRecord,
        headers: list[tuple[str, bytes]],
        span: Span,
        reason: str,
        exc: BaseException,
        attempts: int,
    ) -> None:
        """Copy the record to ``<topic>.dlq`` with the reason in headers; mark the span ERROR.
        Keeps trying while the DLQ is unreachable (never commits a record it did not park)."""
        dlq = c.dlq_topic(record.topic)
        if span.is_recording():
            if attempts == 0:  # retried failures were recorded per attempt already
                span.record_exception(exc)
            span.set_attribute(c.ATTR_DLQ_TOPIC, dlq)
            span.set_attribute(c.ATTR_ERROR_REASON, reason[:1000])
            span.set_status(Status(StatusCode.ERROR, reason[:500]))
        out = [
            (k, v)
            for k, v in headers
            if k not in c.TRACE_HEADERS and not k.startswith(c.DLQ_HEADER_PREFIX)
        ]
        out += [
            (c.DLQ_REASON_HEADER, reason.encode()[:4000]),
            (c.DLQ_ERROR_HEADER, type(exc).__name__.encode()),
            (c.DLQ_STEP_HEADER, self.step.id.encode()),
            (c.DLQ_SOURCE_TOPIC_HEADER, record.topic.encode()),
            (c.DLQ_SOURCE_PARTITION_HEADER, str(record.partition).encode()),
            (c.DLQ_SOURCE_OFFSET_HEADER, str(record.offset).encode()),
            (c.DLQ_ATTEMPTS_HEADER, str(attempts).encode()),
        ]
        delay = self.backoff_s
        value = record.value
        while True:
            try:
                await self.producer.send_raw(dlq, value, key=record.key, headers=out)
                break
            except MessageSizeTooLargeError:
                # never retried into a wedge: park the head of the value, say so in a header
                # (the full record stays at its source offset until the topic's retention)
                log.warning("%s: record too large for %s; parking its head", self.step.id, dlq)
                size = len(record.value or b"")
                value = (record.value or b"")[:MAX_RECORD_BYTES]
                out = [(k, v) for k, v in out if k != c.DLQ_TRUNCATED_HEADER]
                out.append((c.DLQ_TRUNCATED_HEADER, str(size).encode()))
                if len(value) == size:  # the headers alone are too large: drop the record value
                    value = b""
            except Exception as send_exc:  # noqa: BLE001 - keep the record until it is parked
                log.error("%s: cannot write to %s (%s); retrying", self.step.id, dlq, send_exc)
                if await self._stop_during(delay):
                    raise _Abandon() from send_exc
                delay = min(self.max_backoff_s, delay * 2)
        self.stats["dead_lettered"] += 1

    async def _commit(self, record: ConsumerRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        upto = record.offset + 1
        if _lane_key.get() >= 0:  # handled by a lane: records of a partition finish out of order
            mark = self._marks.get(tp)
            if mark is None:  # revoked meanwhile: its new owner handles it again
                return
            moved = mark.finished(record.offset)
            if moved is None:  # an earlier record of the partition is still being handled
                return
            upto = moved
        if self._committer is not None and not self._committer.done():
            # committed by the commit loop once this record's spans are exported: a process
            # killed before that gets the record again (a duplicate), never a lost step span
            self._pending[tp] = upto
            return
        await self._commit_offsets({tp: upto})

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval_s)
            try:
                await self._commit_pending()
            except Exception:  # noqa: BLE001 - the offsets stay uncommitted: redelivered
                log.warning("deferred offset commit failed", exc_info=True)

    async def _commit_pending(self) -> None:
        """Export the spans of the records handled so far, then commit their offsets."""
        if not self._pending:
            return
        offsets, self._pending = self._pending, {}
        flushed = await asyncio.to_thread(flush_tracing, self.flush_timeout_s)
        now = time.monotonic()
        since = self._unflushed_since = self._unflushed_since or now
        if not flushed and now - since < UNFLUSHED_COMMIT_S:
            # the spans are still queued (collector down): a kill now must redeliver, not lose
            for tp, offset in offsets.items():
                self._pending.setdefault(tp, offset)  # a newer offset of the same partition wins
            return
        self._unflushed_since = None
        await self._commit_offsets(offsets)

    async def _commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        for attempt in range(1, 4):
            try:
                await self._consumer.commit(offsets)
                return
            except CommitFailedError as exc:
                log.warning(
                    "offset commit failed (rebalanced?): %s; record may be redelivered", exc
                )
                return
            except KafkaError as exc:
                if attempt == 3:
                    log.warning("offset commit failed: %s; record may be redelivered", exc)
                    return
                await asyncio.sleep(self.backoff_s * attempt)

    async def _stop_during(self, delay: float) -> bool:
        """Sleep ``delay`` unless stop is requested first; True if stop was requested."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=delay)
            return True
        except TimeoutError:
            return False


def _header(headers: list[tuple[str, bytes]], key: str) -> bytes | None:
    for k, v in headers:
        if k == key:
            return v
    return None


def _payload_cid(envelope: Envelope, spec: PipelineSpec) -> str | None:
    for key in (spec.correlation_key, "correlation_id"):
        value = envelope.payload.get(key)
        if value not in (None, ""):
            return str(value)
    return None


@contextlib.contextmanager
def _baggage(cid: str | None) -> Any:
    if not cid or baggage.get_baggage(BAGGAGE_KEY) == cid:
        yield
        return
    token = context.attach(baggage.set_baggage(BAGGAGE_KEY, cid))
    try:
        yield
    finally:
        context.detach(token)


__all__ = [
    "EffectCheck",
    "EffectMissing",
    "Emit",
    "Handler",
    "HopContext",
    "HopHooks",
    "HopOptions",
    "HopRuntime",
    "PROCESSED_EVENTS_DDL",
    "RecordInfo",
    "default_effect_check",
    "ensure_processed_events",
    "is_outage",
    "is_retryable",
]
