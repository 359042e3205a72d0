"""OTLP receivers: multi-member gzip bodies are decoded whole (still capped), 503 refusals are
counted apart from drops, a dead Kafka span source task is restarted, ``/healthz`` (liveness) and
``/readyz`` (readiness: database reachable, queue below its cap) answer apart.

Before the fix a gzip body of several members (what ``cat a.gz b.gz`` or a streaming compressor
produces; RFC 1952 allows it) was cut to its first member and answered 200: the other members'
spans were lost without a word."""

from __future__ import annotations

import gzip
import re

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from hoptrace.collector import kafka_source
from hoptrace.collector.service import Collector

from ..support import create_topics, delete_topics, wait_for
from .helpers import request, step_span

PB = {"content-type": "application/x-protobuf"}
GZ = {**PB, "content-encoding": "gzip"}


def _url(c: Collector, path: str = "/v1/traces") -> str:
    return f"http://127.0.0.1:{c.http_port}{path}"


async def test_multi_member_gzip_is_decoded_whole_and_still_capped(
    make_collector, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    c = await make_collector(max_body_bytes=64 * 1024)
    # protobuf messages concatenate: two requests' bytes are one request with both spans
    first = request([step_span("member-1", 0)]).SerializeToString()
    second = request([step_span("member-2", 0), step_span("member-2", 1)]).SerializeToString()
    body = gzip.compress(first) + gzip.compress(second)
    async with httpx.AsyncClient() as h:
        r = await h.post(_url(c), content=body, headers=GZ)
        assert r.status_code == 200, r.text
        # each member under the cap, together over it: refused, not cut
        piece = gzip.compress(b"\x0a" * (40 * 1024))
        r = await h.post(_url(c), content=piece + piece, headers=GZ)
        assert r.status_code == 413, r.text
        # a member followed by bytes that are no gzip member: refused, not cut
        r = await h.post(_url(c), content=gzip.compress(first) + b"trailing junk", headers=GZ)
        assert r.status_code == 400, r.text
        # an empty member among others is fine (gzip(1) writes one for an empty input)
        r = await h.post(
            _url(c),
            content=gzip.compress(b"")
            + gzip.compress(request([step_span("m-3", 0)]).SerializeToString()),
            headers=GZ,
        )
        assert r.status_code == 200, r.text
    assert await c.drain()
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT correlation_id, count(*) FROM spans GROUP BY 1")
    finally:
        await conn.close()
    assert dict(rows) == {"member-1": 1, "member-2": 2, "m-3": 1}


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


async def test_refusals_are_counted_apart_from_drops_and_readyz_follows_the_queue(
    make_collector,
) -> None:  # type: ignore[no-untyped-def]
    c = await make_collector(writers=0, queue_max_spans=2)
    async with httpx.AsyncClient() as h:
        assert (await h.get(_url(c, "/readyz"))).status_code == 200
        before = (await h.get(_url(c, "/metrics"))).text
        full = request([step_span("q-1", 0), step_span("q-1", 1)]).SerializeToString()
        assert (await h.post(_url(c), content=full, headers=PB)).status_code == 200
        one = request([step_span("q-2", 0)]).SerializeToString()
        for _ in range(3):
            r = await h.post(_url(c), content=one, headers=PB)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        after = (await h.get(_url(c, "/metrics"))).text
        refused = _metric(after, "hoptrace_spans_refused_total", transport="http")
        refused -= _metric(before, "hoptrace_spans_refused_total", transport="http")
        dropped = _metric(after, "hoptrace_spans_dropped_total", reason="queue_full")
        dropped -= _metric(before, "hoptrace_spans_dropped_total", reason="queue_full")
        assert refused == 3 and dropped == 0  # the sender retries them: nothing was dropped
        # the queue is at its cap: not ready (compose holds traffic), still alive
        r = await h.get(_url(c, "/readyz"))
        assert r.status_code == 503 and "queue" in r.text
        assert (await h.get(_url(c, "/healthz"))).status_code == 200


async def test_readyz_says_not_ready_while_the_database_is_unreachable(
    make_collector, db_url: str, admin_db_url: str
) -> None:  # type: ignore[no-untyped-def]
    c = await make_collector()
    name = db_url.rpartition("/")[2]
    admin = await asyncpg.connect(admin_db_url)
    try:
        async with httpx.AsyncClient() as h:
            assert (await h.get(_url(c, "/readyz"))).status_code == 200
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )

            async def not_ready() -> bool:
                r = await h.get(_url(c, "/readyz"))
                return r.status_code == 503 and "database" in r.text

            await wait_for(not_ready, timeout=15, what="/readyz 503 while the store is away")
            assert (await h.get(_url(c, "/healthz"))).status_code == 200  # alive all along
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')

            async def ready() -> bool:
                return (await h.get(_url(c, "/readyz"))).status_code == 200

            await wait_for(ready, timeout=15, what="/readyz 200 once the store is back")
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()


async def test_a_dead_kafka_span_source_is_restarted(
    make_collector,
    kafka_bootstrap: str,
    suffix: str,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    """An unexpected exception (here: the decoder) used to end the source's task for good: the
    collector went on receiving OTLP but never read the topic again. Now the task is restarted
    (its uncommitted records are read again) and the restart is counted."""
    topic, group = f"otlp-spans-{suffix}", f"hoptrace-collector-{suffix}"
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    real = kafka_source.decode_body
    calls = {"n": 0}

    def flaky(body: bytes, now, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("decoder bug")
        return real(body, now, **kw)

    monkeypatch.setattr(kafka_source, "decode_body", flaky)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        req = request([step_span("kafka-r", 0), step_span("kafka-r", 1)])
        await producer.send_and_wait(topic, req.SerializeToString(), key=b"kafka-r")
    finally:
        await producer.stop()
    c = await make_collector(
        span_topic=topic, span_group=group, kafka_bootstrap=kafka_bootstrap, stall_scan_interval=5
    )
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:

        async def stored() -> bool:
            return await pool.fetchval("SELECT count(*) FROM spans") == 2

        await wait_for(stored, timeout=60, what="the record's spans after the source restarted")
        assert c.kafka is not None and c.kafka.restarts >= 1
        async with httpx.AsyncClient() as h:
            text = (await h.get(_url(c, "/metrics"))).text
        assert _metric(text, "hoptrace_kafka_source_restarts_total") >= 1
    finally:
        await pool.close()
        await delete_topics(kafka_bootstrap, [topic])
