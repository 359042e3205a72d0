"""The hop runtime's lifecycle: ``HopRuntime`` (a worker registers a handler for its step; the
runtime does the rest), its run/stop, SIGTERM/SIGINT handling and consumer set-up, and the
consumer loop that hands fetched records to the lanes.

Its parts, one module each: ``record`` (one record end to end), ``lanes`` (concurrency,
watermark, back-pressure), ``ledger`` (idempotency), ``retry`` (classification),
``dead_letter`` (parking), ``commits`` (commit-after-export).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from opentelemetry.instrumentation.utils import suppress_instrumentation

from hoptrace.contract import Outcome, PipelineSpec
from hoptrace.kafka import client_options

from .._accel import Speedup, enabled
from ..envelope import Envelope
from ..producer import HopProducer
from ..quiet import quiet
from ..tracing import get_tracer
from .commits import OffsetCommits
from .context import EffectCheck, Handler, HopHooks
from .dead_letter import DeadLetterWriter
from .lanes import Lanes
from .ledger import Ledger, ensure_processed_events, purge_marks
from .options import HopOptions
from .record import RecordSteps

log = logging.getLogger(__name__)


class _Assigned(ConsumerRebalanceListener):
    def __init__(self, runtime: HopRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.runtime._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.runtime.assigned = set(assigned)
        self.runtime.ready.set()


# One signal handler for all runtimes running in this process.
_running: set[HopRuntime] = set()


def _on_signal() -> None:
    for rt in list(_running):
        rt.request_stop()


class HopRuntime(RecordSteps):
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
        self.ledger = Ledger(
            self.step, effect_check, verify_effect=o.verify_effect, traced=o.trace_bookkeeping
        )
        self.effect_check = self.ledger.effect_check
        self.validate = validate
        self.max_attempts = max(1, o.max_attempts)
        self.backoff_s = o.backoff_s
        self.max_backoff_s = o.max_backoff_s
        self.hooks = hooks or HopHooks()
        self.receive_spans = o.receive_spans
        self.send_spans = o.send_spans
        self._own_producer = producer is None
        self.producer = producer or HopProducer(o.bootstrap)
        self._stop = asyncio.Event()
        self.lanes = Lanes(
            o.max_lanes,
            o.lane_buffer,
            process=self.process,
            pause=self._pause,
            resume=self._resume,
            stop=self._stop,
        )
        self.commits = OffsetCommits(
            lambda: self._consumer,
            interval_s=o.commit_interval_s,
            flush_timeout_s=o.flush_timeout_s,
            backoff_s=o.backoff_s,
        )
        self.dead_letters = DeadLetterWriter(
            self.producer,
            self.step.id,
            backoff_s=o.backoff_s,
            max_backoff_s=o.max_backoff_s,
            stop_during=self._stop_during,
        )
        self._conns: dict[int, asyncpg.Connection] = {}  # per lane (see record._connection)
        self.ready = asyncio.Event()
        self.assigned: set[TopicPartition] = set()
        self.stats: dict[str, int] = {
            Outcome.OK.value: 0,
            Outcome.DUPLICATE.value: 0,
            Outcome.ERROR.value: 0,
            "dead_lettered": 0,
            "retries": 0,
        }
        self._consumer: AIOKafkaConsumer | None = None
        self._pool: asyncpg.Pool | None = None
        self._tracer = get_tracer()
        self._warned_no_emits = False

    # the commit loop and its pending offsets (tests look at them)
    @property
    def _committer(self) -> asyncio.Task[None] | None:
        return self.commits.task

    @_committer.setter
    def _committer(self, task: asyncio.Task[None] | None) -> None:
        self.commits.task = task

    @property
    def _pending(self) -> dict[TopicPartition, int]:
        return self.commits.pending

    async def _commit_pending(self) -> None:
        await self.commits.commit_pending()

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
        o = self.options
        self._tracer = get_tracer()  # tracing may have been configured after __init__
        self._pool = await asyncpg.create_pool(
            self.database_url, min_size=1, max_size=self.lanes.max_lanes + 1
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset=o.auto_offset_reset,
            **{**client_options(), **o.consumer_opts},  # security: HOPTRACE_KAFKA_* unless given
        )
        installed = False
        purger: asyncio.Task[None] | None = None
        try:
            async with self._pool.acquire() as conn:
                await ensure_processed_events(conn)
            await self.producer.start()
            self._consumer.subscribe([self.step.consumes], listener=_Assigned(self))
            await self._consumer.start()
            if o.commit_after_export:
                self.commits.start()
            if o.ledger_retention is not None:
                purger = asyncio.create_task(self._purge_ledger(o.ledger_retention))
            installed = self._install_signals()
            await self._loop()
        finally:
            if purger is not None:
                purger.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await purger
            if installed:
                self._remove_signals()
            await self.commits.stop()
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            if self._own_producer:
                with contextlib.suppress(Exception):
                    await self.producer.stop()
            for key in list(self._conns):
                await self._drop_connection(key)
            with contextlib.suppress(Exception):
                await self._pool.close()
            await self.commits.flush()

    async def _purge_ledger(self, retention: timedelta) -> None:
        """Retention of the step's processed marks: at start, then every
        ``ledger_purge_interval_s``; a failure is logged and tried again next time."""
        assert self._pool is not None
        while True:
            try:
                with suppress_instrumentation():  # bookkeeping: no spans (acquire, reset, purge)
                    async with self._pool.acquire() as conn:
                        n = await purge_marks(conn, self.step.id, retention)
                if n:
                    log.info("%s: purged %d old processed mark(s)", self.step.id, n)
            except Exception as exc:  # noqa: BLE001 - housekeeping never stops the hop
                log.warning("%s: purging old processed marks failed: %s", self.step.id, exc)
            await asyncio.sleep(self.options.ledger_purge_interval_s)

    def _install_signals(self) -> bool:
        if (
            not self.options.handle_signals
            or threading.current_thread() is not threading.main_thread()
        ):
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

    def _fetcher(self, consumer: AIOKafkaConsumer) -> Callable[..., Any]:
        """``getmany`` without the aiokafka instrumentation's receive spans (unless
        ``receive_spans``): the process span, child of the same extracted context, carries
        everything a receive span would. Past its wrapper when the speed-up allows, else
        through it under ``quiet()``."""
        if self.receive_spans:
            return consumer.getmany
        if enabled(Speedup.AIOKAFKA):
            from .._accel.aiokafka import unwrapped_getmany

            plain = unwrapped_getmany(consumer)
            if plain is not None:
                return plain

        async def getmany(*args: Any, **kwargs: Any) -> Any:
            with quiet():
                return await consumer.getmany(*args, **kwargs)

        return getmany

    async def _loop(self) -> None:
        """Fetch batches and hand each record to its partition's lane; lanes run concurrently.
        Returns when stop is requested (after the lanes finished the records in hand)."""
        assert self._consumer is not None
        getmany = self._fetcher(self._consumer)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        failed_wait = asyncio.ensure_future(self.lanes.failed.wait())
        try:

            async def fetch() -> tuple[dict[TopicPartition, list[Any]], int]:
                batch = await getmany(timeout_ms=1000, max_records=self.lanes.lane_buffer)
                # read as getmany returns (no other task runs in between): the records belong
                # to the assignment of this moment (aiokafka returns none while a rebalance is
                # in progress); a revoke after this makes the batch stale (Lanes.dispatch)
                return batch, self.lanes.epoch

            while not self._stop.is_set():
                get = asyncio.ensure_future(fetch())
                done, _ = await asyncio.wait(
                    {get, stop_wait, failed_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await get
                    break
                batch, fetched_at = get.result()
                for tp, records in batch.items():
                    if records:
                        self.lanes.dispatch(tp, records, fetched_at)
            self._stop.set()  # lanes finish the record in hand and leave the rest
            await self.lanes.drain()
        finally:
            stop_wait.cancel()
            failed_wait.cancel()
            self.lanes.cancel()

    def _pause(self, tp: TopicPartition) -> None:
        assert self._consumer is not None
        self._consumer.pause(tp)

    def _resume(self, tp: TopicPartition) -> None:
        if self._consumer is not None and tp in self.assigned:
            self._consumer.resume(tp)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Partitions taken away: the lanes drop their waiting records and wait briefly for a
        record of theirs in hand; what was handled is committed while the offsets are ours."""
        await self.lanes.revoke(revoked)
        if self.commits.task is not None:
            with contextlib.suppress(Exception):
                await self.commits.commit_pending()

    async def _stop_during(self, delay: float) -> bool:
        """Sleep ``delay`` unless stop is requested first; True if stop was requested."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=delay)
            return True
        except TimeoutError:
            return False
