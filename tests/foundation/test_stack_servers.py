"""The shared local stack is real: a record goes through the broker, a query through Postgres,
and a topic nobody created does not appear by itself."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ..support import create_topics, delete_topics, unique


async def test_record_round_trips_through_the_broker(kafka_bootstrap: str) -> None:
    topic = unique("roundtrip-")
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"hello", key=b"k", headers=[("h", b"v")])
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=unique("g-"),
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
        await delete_topics(kafka_bootstrap, [topic])
    assert (record.value, record.key, record.offset) == (b"hello", b"k", meta.offset)
    assert dict(record.headers)["h"] == b"v"


async def test_postgres_answers_a_query(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        version = await conn.fetchval("SHOW server_version_num")
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO t VALUES (1), (2)")
        total = await conn.fetchval("SELECT sum(id) FROM t")
    finally:
        await conn.close()
    assert int(version) >= 150000
    assert total == 3


async def test_producing_to_a_missing_topic_fails_because_auto_create_is_off(
    kafka_bootstrap: str,
) -> None:
    topic = unique("never-created-")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=1500)
    await producer.start()
    try:
        with pytest.raises(KafkaError):
            await producer.send_and_wait(topic, b"lost?")
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topic not in await admin.list_topics()
    finally:
        await admin.close()


async def test_readonly_role_cannot_write(admin_db_url: str) -> None:
    ro_url = admin_db_url.replace("hoptrace:hoptrace@", "hoptrace_ro:hoptrace_ro@", 1)
    conn = await asyncpg.connect(ro_url)
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("CREATE TEMP TABLE x (id int)")
    finally:
        await conn.close()
