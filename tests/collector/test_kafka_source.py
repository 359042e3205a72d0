"""Kafka span source: OTLP protobuf records from a real topic land in the store; offsets committed
only after the write."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from hoptrace.collector import store
from hoptrace.collector.service import Collector

from ..support import create_topics, delete_topics, wait_for
from .helpers import request, spans_locked, step_span


async def test_kafka_topic_spans_stored_and_committed(
    make_collector, kafka_bootstrap: str, suffix: str, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    topic, group = f"otlp-spans-{suffix}", f"hoptrace-collector-{suffix}"
    await create_topics(kafka_bootstrap, [topic], partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for k in range(10):
            req = request([step_span(f"kafka-{k}", 0), step_span(f"kafka-{k}", 1)])
            await producer.send_and_wait(topic, req.SerializeToString(), key=f"kafka-{k}".encode())
        await producer.send_and_wait(topic, b"\xff\xff not protobuf")  # counted, skipped
    finally:
        await producer.stop()
    c = await make_collector(span_topic=topic, span_group=group, kafka_bootstrap=kafka_bootstrap)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:

        async def all_there():  # type: ignore[no-untyped-def]
            n = await pool.fetchval("SELECT count(*) FROM spans")
            return n == 20

        await wait_for(all_there, timeout=30, what="20 spans from kafka")
        row = await store.correlation(pool, "kafka-3")
        assert row is not None and row.last_step == "purchase.created"

        async def committed():  # type: ignore[no-untyped-def]
            offsets = await admin.list_consumer_group_offsets(group)
            return sum(o.offset for tp, o in offsets.items() if tp.topic == topic) == 11 or None

        await wait_for(committed, timeout=15, what="offsets committed past all 11 records")
        assert c.kafka is not None and c.kafka.assigned.is_set()
    finally:
        await admin.close()
        await pool.close()
        await delete_topics(kafka_bootstrap, [topic])


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy", "gzip"])
async def test_compressed_span_topic_spans_stored(
    make_collector, kafka_bootstrap: str, suffix: str, db_url: str, codec: str
) -> None:  # type: ignore[no-untyped-def]
    """An OpenTelemetry Collector's kafka exporter often compresses: record batches compressed
    with each codec Kafka has are read (aiokafka's codecs come from cramjam) and stored."""
    topic, group = f"otlp-spans-{codec}-{suffix}", f"hoptrace-collector-{codec}-{suffix}"
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type=codec)
    await producer.start()
    try:
        batch = producer.create_batch()
        for k in range(5):  # one compressed record batch of several records
            req = request([step_span(f"{codec}-{k}", 0), step_span(f"{codec}-{k}", 1)])
            assert batch.append(key=None, value=req.SerializeToString(), timestamp=None)
        await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()
    await make_collector(span_topic=topic, span_group=group, kafka_bootstrap=kafka_bootstrap)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:

        async def all_there():  # type: ignore[no-untyped-def]
            return await pool.fetchval("SELECT count(*) FROM spans") == 10

        await wait_for(all_there, timeout=30, what=f"10 spans from {codec} records")
        row = await store.correlation(pool, f"{codec}-4")
        assert row is not None and row.last_step == "purchase.created"
    finally:
        await pool.close()
        await delete_topics(kafka_bootstrap, [topic])


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def test_kafka_unreachable_at_start_is_retried_until_it_is_back(
    make_collector, kafka_bootstrap: str, suffix: str, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Collector started while the broker cannot be reached: it says so, keeps retrying (its
    consumer closed each time), and reads the topic once the broker answers."""
    topic, group = f"otlp-spans-{suffix}", f"hoptrace-collector-{suffix}"
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there yet
    kafka_host, kafka_port = kafka_bootstrap.rsplit(":", 1)
    pipes: list[asyncio.Task[None]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(kafka_host, int(kafka_port))
        pipes.extend(
            [
                asyncio.create_task(_forward(reader, up_writer)),
                asyncio.create_task(_forward(up_reader, writer)),
            ]
        )

    caplog.set_level(logging.WARNING, logger="hoptrace.collector.kafka_source")
    c = await make_collector(
        span_topic=topic, span_group=group, kafka_bootstrap=f"127.0.0.1:{port}"
    )
    assert c.kafka is not None
    source = c.kafka

    async def failed_once():  # type: ignore[no-untyped-def]
        return source.start_failures >= 1 or None

    await wait_for(failed_once, timeout=30, what="a failed start")
    assert f"cannot start on 127.0.0.1:{port}" in caplog.text
    assert not source.assigned.is_set()
    # the broker becomes reachable at that address (it then advertises its own listener)
    server = await asyncio.start_server(relay, "127.0.0.1", port)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            req = request([step_span("kafka-late", 0), step_span("kafka-late", 1)])
            await producer.send_and_wait(topic, req.SerializeToString(), key=b"kafka-late")
        finally:
            await producer.stop()

        async def stored():  # type: ignore[no-untyped-def]
            return await pool.fetchval("SELECT count(*) FROM spans") == 2 or None

        await wait_for(stored, timeout=60, what="the 2 spans once the broker is reachable")
        assert source.assigned.is_set()
    finally:
        await pool.close()
        server.close()
        for task in pipes:
            task.cancel()
        await delete_topics(kafka_bootstrap, [topic])


def _received_from_kafka() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("hoptrace_spans_received_total", {"transport": "kafka"}) or 0.0


@dataclass
class _Locked:
    """A collector reading a new 2-partition span topic whose span writes wait until
    ``release()``; a producer and a pool on its store; the spans received from Kafka before."""

    bootstrap: str
    topic: str
    group: str
    collector: Collector
    producer: AIOKafkaProducer
    pool: asyncpg.Pool
    release: Callable[[], Awaitable[None]]
    before: float

    def received(self) -> float:
        return _received_from_kafka() - self.before

    async def produce(self, cids: list[str], **send: Any) -> None:
        for k, cid in enumerate(cids):
            req = request([step_span(cid, 0), step_span(cid, 1)])
            where = {key: value(k) for key, value in send.items()}
            await self.producer.send_and_wait(self.topic, req.SerializeToString(), **where)

    async def spans(self) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM spans")

    async def committed(self) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(self.group)
        finally:
            await admin.close()
        return sum(o.offset for tp, o in offsets.items() if tp.topic == self.topic)


@asynccontextmanager
async def _collector_on_a_locked_store(
    make_collector, bootstrap: str, suffix: str, db_url: str
) -> AsyncIterator[_Locked]:  # type: ignore[no-untyped-def]
    topic, group = f"otlp-spans-{suffix}", f"hoptrace-collector-{suffix}"
    await create_topics(bootstrap, [topic], partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=3)
    try:
        c = await make_collector(span_topic=topic, span_group=group, kafka_bootstrap=bootstrap)
        assert c.kafka is not None
        await wait_for(lambda: _async(c.kafka.assigned.is_set()), timeout=30, what="assignment")
        async with spans_locked(pool) as release:
            yield _Locked(
                bootstrap, topic, group, c, producer, pool, release, _received_from_kafka()
            )
    finally:
        await producer.stop()
        await pool.close()
        await delete_topics(bootstrap, [topic])


async def test_the_source_reads_ahead_while_writes_are_pending_and_commits_only_written(
    make_collector, kafka_bootstrap: str, suffix: str, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    """The store stops taking spans (a lock on ``spans``): records produced after the first ones
    are still read and queued (the source does not wait for one fetch's write before the next),
    and no offset is committed until their spans are written; then every offset is."""
    async with _collector_on_a_locked_store(make_collector, kafka_bootstrap, suffix, db_url) as s:
        key = {"key": lambda k: f"ahead-{k}".encode()}
        await s.produce([f"ahead-{k}" for k in range(5)], **key)
        await wait_for(lambda: _async(s.received() >= 2), what="a first record queued")
        await s.produce([f"ahead-{k}" for k in range(5, 10)], **key)  # read while it waits
        await wait_for(
            lambda: _async(s.received() >= 20),
            timeout=10,
            what="the other records read ahead of the pending write",
        )
        assert await s.committed() == 0  # nothing written, nothing committed
        assert await s.spans() == 0
        await s.release()
        await wait_for(lambda: _async_eq(s.spans(), 20), timeout=30, what="20 spans written")
        await wait_for(
            lambda: _async_eq(s.committed(), 10), timeout=15, what="offsets committed past all 10"
        )


async def _async(value: object) -> object:
    return value


async def _async_eq(value, expected: object) -> bool:  # type: ignore[no-untyped-def]
    return await value == expected
