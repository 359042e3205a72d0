"""Kafka span source: a consumer group reading OTLP protobuf ``ExportTraceServiceRequest`` records
(what the OpenTelemetry Collector's Kafka exporter writes with ``encoding: otlp_proto``) into the
same write queue. Offsets are committed only after the records' spans are written, so a crash
re-delivers (duplicates are harmless) and nothing is lost. Undecodable records are counted and
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
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CommitFailedError, KafkaError

from hoptrace.contract.conventions import MESSAGING_SYSTEM_KAFKA
from hoptrace.kafka import client_options, explain, kafka_settings
from hoptrace.settings import KafkaSettings

from . import metrics
from .decode import DEFAULT_KEYS, DecodeFailure, DecodeKeys, decode_body, parse_protobuf
from .ingest import SpanWindow
from .spanqueue import SpanQueue

log = logging.getLogger("hoptrace.collector.kafka_source")


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
        consumer = self.consumer = await self._start()
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=500, max_records=self.max_records)
                if consumer.assignment():
                    self.assigned.set()
                if not batch:
                    continue
                pending: list[asyncio.Future[None]] = []
                now = datetime.now(UTC)
                for records in batch.values():
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
                if pending:
                    await asyncio.gather(*pending)
                try:
                    await consumer.commit()
                except (CommitFailedError, KafkaError) as exc:
                    log.warning("offset commit failed (records will be re-read): %s", exc)
        finally:
            await consumer.stop()

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
