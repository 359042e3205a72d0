"""The hop runtime's lanes: records of different partitions are handled concurrently by one
consumer, each partition in offset order, each record once; a partition whose lane is behind is
paused (back-pressure) and resumed; offsets end committed past the last record."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from hoptrace.contract import PipelineSpec, load_spec
from hoptrace.instrumentation.envelope import Envelope
from hoptrace.instrumentation.hop import HopContext, HopOptions, HopRuntime, _slot
from hoptrace.instrumentation.producer import HopProducer
from tests.instrumentation.helpers import committed, running
from tests.support import create_topics, delete_topics, wait_for

PARTITIONS = 3
PER_PARTITION = 30


@pytest.fixture
def spec(spec_path: Path) -> PipelineSpec:
    return load_spec(spec_path)


@pytest.fixture
def topics(spec: PipelineSpec, kafka_bootstrap: str):
    asyncio.run(create_topics(kafka_bootstrap, spec.topics, partitions=PARTITIONS))
    yield spec.topics
    asyncio.run(delete_topics(kafka_bootstrap, spec.topics))


async def _fill(bootstrap: str, topic: str) -> None:
    """PER_PARTITION records in each partition, sent to explicit partitions."""
    async with HopProducer(bootstrap) as producer:
        for n in range(PER_PARTITION):
            for p in range(PARTITIONS):
                env = Envelope.new("TRAINER_ALLOCATED", 1, f"lane-{p}-{n}", {"n": n})
                await producer._producer.send_and_wait(topic, env.to_bytes(), partition=p)


async def _run(spec, kafka_bootstrap, db_url, **opts) -> tuple[HopRuntime, list, int]:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE TABLE tutoring_sessions (correlation_id text PRIMARY KEY)")
    finally:
        await conn.close()
    topic = spec.step("session.created").consumes
    await _fill(kafka_bootstrap, topic)
    seen: list[tuple[int, int]] = []
    in_flight = 0
    most = 0

    async def handler(ctx: HopContext) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        seen.append((ctx.record.partition, ctx.record.offset))
        await ctx.conn.execute(
            "INSERT INTO tutoring_sessions VALUES ($1)", ctx.correlation_id
        )  # a second row for one record would raise: each record is handled once
        await asyncio.sleep(0.002)  # the overlap the lanes exist for
        in_flight -= 1

    rt = HopRuntime(
        spec,
        "session.created",
        handler,
        HopOptions(
            bootstrap=kafka_bootstrap,
            database_url=db_url,
            handle_signals=False,
            commit_interval_s=0.1,
            **opts,
        ),
    )
    total = PARTITIONS * PER_PARTITION
    async with running(rt):
        await wait_for(lambda: _at_least(rt, total), timeout=60, what="all records handled")
        group = spec.step("session.created").group
        want = dict.fromkeys(range(PARTITIONS), PER_PARTITION)
        await wait_for(
            lambda: _committed_is(kafka_bootstrap, group, topic, want),
            timeout=30,
            what="offsets committed",
        )
    return rt, seen, most


async def _at_least(rt: HopRuntime, n: int) -> bool:
    return rt.stats["ok"] >= n


async def _committed_is(bootstrap: str, group: str, topic: str, want: dict) -> bool:
    return await committed(bootstrap, group, topic, PARTITIONS) == want


def _in_order(seen: list[tuple[int, int]]) -> bool:
    for p in range(PARTITIONS):
        offsets = [o for q, o in seen if q == p]
        if offsets != list(range(PER_PARTITION)):
            return False
    return True


async def test_partitions_are_handled_concurrently_each_in_order(
    spec, topics, kafka_bootstrap, db_url
) -> None:
    rt, seen, most = await _run(spec, kafka_bootstrap, db_url)
    assert rt.stats["ok"] == PARTITIONS * PER_PARTITION and rt.stats["error"] == 0
    assert _in_order(seen)
    assert most >= 2  # records of different partitions overlapped
    assert rt._conns == {}  # every lane's connection went back to the pool


async def test_a_lane_behind_pauses_its_partition_and_resumes_it(
    spec, topics, kafka_bootstrap, db_url, monkeypatch
) -> None:
    paused: list[int] = []
    resumed: list[int] = []
    real_pause = __import__("aiokafka").AIOKafkaConsumer.pause
    real_resume = __import__("aiokafka").AIOKafkaConsumer.resume

    def pause(self, *tps):  # noqa: ANN001, ANN202
        paused.extend(tp.partition for tp in tps)
        return real_pause(self, *tps)

    def resume(self, *tps):  # noqa: ANN001, ANN202
        resumed.extend(tp.partition for tp in tps)
        return real_resume(self, *tps)

    monkeypatch.setattr("aiokafka.AIOKafkaConsumer.pause", pause)
    monkeypatch.setattr("aiokafka.AIOKafkaConsumer.resume", resume)
    # one lane for all partitions, room for 4 records: pauses and resumes all along
    rt, seen, most = await _run(spec, kafka_bootstrap, db_url, max_lanes=1, lane_buffer=4)
    assert rt.stats["ok"] == PARTITIONS * PER_PARTITION and rt.stats["error"] == 0
    assert _in_order(seen)
    assert most == 1  # one lane: one record at a time
    assert paused and resumed


async def test_keys_of_one_partition_overlap_and_the_commit_waits_for_the_slowest(
    spec, topics, kafka_bootstrap, db_url
) -> None:
    """One partition, several keys: a record held up does not hold up the other lanes, the
    records of its lane (its key's among them) wait behind it, and the committed offset stays
    at it until it is done."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE TABLE tutoring_sessions (correlation_id text PRIMARY KEY)")
    finally:
        await conn.close()
    step = spec.step("session.created")
    n, keys, lanes, held = 32, 8, 4, 5

    def key(i: int) -> bytes:
        return f"k{i % keys}".encode()

    def lane(i: int) -> int:
        return _slot(key(i), 0, lanes)

    async with HopProducer(kafka_bootstrap) as producer:
        for i in range(n):
            env = Envelope.new("TRAINER_ALLOCATED", 1, f"key-{i % keys}-{i}", {"i": i})
            await producer._producer.send_and_wait(
                step.consumes, env.to_bytes(), key=key(i), partition=0
            )
    blocked = [i for i in range(held + 1, n) if lane(i) == lane(held)]
    passing = [i for i in range(held + 1, n) if lane(i) != lane(held)]
    assert blocked and passing  # the keys spread over more than one lane
    release = asyncio.Event()
    order: list[int] = []

    async def handler(ctx: HopContext) -> None:
        if ctx.record.offset == held:
            await release.wait()
        await ctx.conn.execute("INSERT INTO tutoring_sessions VALUES ($1)", ctx.correlation_id)
        order.append(ctx.record.offset)

    rt = HopRuntime(
        spec,
        "session.created",
        handler,
        HopOptions(
            bootstrap=kafka_bootstrap,
            database_url=db_url,
            handle_signals=False,
            commit_interval_s=0.05,
            max_lanes=lanes,
        ),
    )
    async with running(rt):
        await wait_for(
            lambda: _at_least(rt, n - 1 - len(blocked)), timeout=30, what="the other lanes"
        )
        await wait_for(
            lambda: _committed_is(kafka_bootstrap, step.group, step.consumes, {0: held}),
            timeout=10,
            what="offsets committed up to the held record",
        )
        assert not set(order) & set(blocked)  # its lane waits behind it
        assert set(passing) <= set(order)  # the other lanes went past it
        release.set()
        await wait_for(lambda: _at_least(rt, n), timeout=30, what="all records")
        await wait_for(
            lambda: _committed_is(kafka_bootstrap, step.group, step.consumes, {0: n}),
            timeout=10,
            what="all offsets committed",
        )
    for k in range(keys):  # per key: offset order
        mine = [o for o in order if o % keys == k]
        assert mine == sorted(mine) == list(range(k, n, keys))
