"""Kafka span source: a consumer group reading OTLP protobuf ``ExportTraceServiceRequest`` records
(what the OpenTelemetry Collector's Kafka exporter writes with ``encoding: otlp_proto``) into the
same write queue. Offsets are committed only after the records' spans are written, so a crash
re-delivers (duplicates are harmless) and nothing is lost. Undecodable records are counted and
skipped."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CommitFailedError, KafkaError

from . import metrics
from .decode import DecodeFailure, decode_body
from .spanqueue import SpanQueue

log = logging.getLogger("hoptrace.collector.kafka_source")


class KafkaSpanSource:
    def __init__(
        self, bootstrap: str, topic: str, group: str, queue: SpanQueue, max_records: int = 1000
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.queue = queue
        self.max_records = max_records
        self.assigned = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self.consumer = consumer
        await consumer.start()
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
                        try:
                            decoded = decode_body(rec.value or b"", now)
                        except DecodeFailure:
                            metrics.SPANS_DROPPED.labels("undecodable").inc()
                            continue
                        metrics.SPANS_RECEIVED.labels("kafka").inc(decoded.count + decoded.rejected)
                        if decoded.rejected:
                            metrics.SPANS_DROPPED.labels("invalid").inc(decoded.rejected)
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
