"""Kafka span source: OTLP protobuf records from a real topic land in the store; offsets committed
only after the write."""

from __future__ import annotations

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from hoptrace.collector import store

from ..support import create_topics, delete_topics, wait_for
from .helpers import request, step_span


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
