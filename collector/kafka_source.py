"""Kafka span source: a consumer group reading OTLP protobuf ``ExportTraceServiceRequest`` records
(what the OpenTelemetry Collector's Kafka exporter writes with ``encoding: otlp_proto``) into the
same write queue. Records are fetched and queued while earlier ones are being written (the
queue's bound holds the reading back), and a partition's offsets are committed only once every
record before them is written, so a crash re-delivers (duplicates are harmless) and nothing is
lost. Records read but not yet committed when partitions move to another reader (a rebalance)
are read again by it (the store drops the duplicates). Undecodable records are counted and
skipped; spans outside the store's time window (:class:`~.ingest.SpanWindow`) are counted and
dropped, as the receivers do. Its consumer connects with the Kafka security settings
(``HOPTRACE_KAFKA_*``, :mod:`hoptrace.kafka`); a start that fails is logged with its cause (a
refused SASL login, say) and retried.

:meth:`KafkaSpanSource.run_forever` is what the collector runs: when the source dies of an
unexpected error (a bug, a client in a state it cannot leave) it is logged, counted
(``hoptrace_kafka_source_restarts``) and started again after a backoff; its uncommitted records are
read again by the new consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from hoptrace.contract.conventions import MESSAGING_SYSTEM_KAFKA
from hoptrace.kafka import client_options, explain, kafka_settings
from hoptrace.settings import KafkaSettings

from . import metrics
from .decode import DEFAULT_KEYS, DecodeFailure, DecodeKeys, decode_body, parse_protobuf
from .ingest import SpanWindow
from .spanqueue import SpanQueue

log = logging.getLogger("hoptrace.collector.kafka_source")

#: How long a fetch waits for records: with nothing being written, and while writes are pending
#: (their offsets are committed between fetches).
WAIT_IDLE_MS = 500
WAIT_WRITING_MS = 50


@dataclass(slots=True)
class _Fetched:
    """One fetch's records being written: the futures of their spans' writes, and the offsets
    to commit per partition once all of them are done."""

    offsets: dict[TopicPartition, int]
    futures: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def written(self) -> bool:
        return all(f.done() for f in self.futures)


class KafkaSpanSource:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        queue: SpanQueue,
        max_records: int = 1000,
        *,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
        window: SpanWindow | None = None,
        keys: DecodeKeys = DEFAULT_KEYS,
        kafka: KafkaSettings | None = None,
    ) -> None:
        self.keys = keys  # the pipeline's correlation carriers, candidates for step matching
        self.bootstrap = bootstrap
        # security (SASL, TLS) from ``kafka`` (default: HOPTRACE_KAFKA_*), checked now: settings
        # that cannot work stop the collector at start instead of retrying forever
        self.kafka = (kafka or kafka_settings()).model_copy(update={"kafka_bootstrap": bootstrap})
        self.client_options = client_options(self.kafka)
        self.topic = topic
        self.group = group
        self.queue = queue
        self.max_records = max_records
        self.assigned = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.start_failures = 0  # starts that failed (broker unreachable)
        self.restarts = 0  # times run() died and was started again
        self.window = window or SpanWindow(max_age=None, max_ahead=None)

    async def _start(self) -> AIOKafkaConsumer:
        """A started consumer. While the broker cannot be reached, says so and tries again with
        backoff (the collector's other inputs keep working meanwhile); a consumer that failed
        to start, or was cancelled while starting, is closed, never left open."""
        delay = self.retry_s
        while True:
            consumer = AIOKafkaConsumer(
                self.topic,
                bootstrap_servers=self.bootstrap,
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                **self.client_options,
            )
            try:
                await consumer.start()
                return consumer
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                if not isinstance(exc, KafkaError | OSError):
                    raise
                self.start_failures += 1
                why = await explain(exc, self.kafka)  # e.g. the broker refused the SASL login
                log.warning(
                    "kafka span source: cannot start on %s (%s); retrying in %.1fs",
                    self.bootstrap,
                    why,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(self.max_retry_s, delay * 2)

    async def run(self) -> None:
        """Fetch, decode and queue records while earlier ones are being written (the write queue's
        bound holds the reading back); commit each partition's offsets once every record before
        them is written, in fetch order."""
        consumer = self.consumer = await self._start()
        inflight: deque[_Fetched] = deque()  # fetched, oldest first, not yet committed
        try:
            while True:
                await self._commit_written(consumer, inflight)
                # while writes are pending, come back soon to commit them
                wait_ms = WAIT_WRITING_MS if inflight else WAIT_IDLE_MS
                batch = await consumer.getmany(timeout_ms=wait_ms, max_records=self.max_records)
                if consumer.assignment():
                    self.assigned.set()
                if batch:
                    fetched = _Fetched({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
                    await self._queue(batch.values(), fetched.futures)
                    inflight.append(fetched)
        finally:
            await consumer.stop()

    async def _queue(
        self, batches: Iterable[list[ConsumerRecord]], pending: list[asyncio.Future[None]]
    ) -> None:
        """Decode the records and queue their spans; adds to ``pending`` the futures the writer
        resolves once each record's spans are committed."""
        loop = asyncio.get_running_loop()
        now = datetime.now(UTC)
        for records in batches:
            for rec in records:
                body = rec.value or b""
                try:
                    decoded = decode_body(body, now, keys=self.keys)
                except DecodeFailure:
                    metrics.SPANS_DROPPED.labels("undecodable").inc()
                    continue
                decoded, outside = self.window.apply(
                    decoded, lambda b=body: parse_protobuf(b), now, self.keys
                )
                metrics.SPANS_RECEIVED.labels(MESSAGING_SYSTEM_KAFKA).inc(
                    decoded.count + decoded.rejected
                )
                if decoded.rejected > outside:
                    metrics.SPANS_DROPPED.labels("invalid").inc(decoded.rejected - outside)
                if outside:
                    metrics.SPANS_DROPPED.labels("out_of_window").inc(outside)
                if decoded.count:
                    fut: asyncio.Future[None] = loop.create_future()
                    spans = decoded.encoded if decoded.encoded is not None else decoded.rows
                    await self.queue.put(spans, fut)
                    pending.append(fut)

    async def _commit_written(self, consumer: AIOKafkaConsumer, inflight: deque[_Fetched]) -> None:
        """Commit the offsets of the fetches written so far, oldest first, stopping at the first
        one still being written (a write that failed for good raises here, as it would have
        in the writer). Offsets of partitions no longer assigned (after a rebalance) are left to
        their new reader, which reads those records again (the store drops the duplicates)."""
        offsets: dict[TopicPartition, int] = {}
        while inflight and inflight[0].written:
            done = inflight.popleft()
            for f in done.futures:
                f.result()
            offsets.update(done.offsets)  # a later fetch's offset of a partition is higher
        assigned = consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("offset commit failed (records will be re-read): %s", exc)

    async def run_forever(self) -> None:
        """:meth:`run`, started again (after a backoff, reset once a run lasted a minute) each
        time it dies; only cancellation ends it."""
        delay = self.retry_s
        while True:
            started = time.monotonic()
            try:
                await self.run()
                log.warning("kafka span source stopped by itself; starting it again")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kafka span source died; starting it again in %.1fs", delay)
            self.consumer = None
            self.assigned.clear()
            self.restarts += 1
            metrics.KAFKA_SOURCE_RESTARTS.inc()
            if time.monotonic() - started > 60:
                delay = self.retry_s
            await asyncio.sleep(delay)
            delay = min(self.max_retry_s, delay * 2)
