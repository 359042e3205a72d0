"""The hop runtime's lanes: records of different partitions are handled concurrently by one
consumer, each partition in offset order, each record once; a partition whose lane is behind is
paused (back-pressure) and resumed; offsets end committed past the last record."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
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


# ----------------------------------------------------------------------- rebalance races


def _records(tp, offsets: range) -> list:  # noqa: ANN001
    from aiokafka.structs import ConsumerRecord

    return [
        ConsumerRecord(tp.topic, tp.partition, o, 0, 0, b"k", b"{}", None, 0, 0, [])
        for o in offsets
    ]


class _Gated:
    """A process function for the lanes: each record waits for its gate, then reports its
    offset finished; every offset the partition would commit is kept in ``committed``."""

    def __init__(self, tp) -> None:  # noqa: ANN001
        self.tp = tp
        self.gates: dict[int, asyncio.Event] = {}
        self.handled: list[int] = []
        self.committed: list[int] = []
        self.lanes = None

    def gate(self, offset: int) -> asyncio.Event:
        return self.gates.setdefault(offset, asyncio.Event())

    async def __call__(self, record) -> None:  # noqa: ANN001
        await self.gate(record.offset).wait()
        self.handled.append(record.offset)
        upto = self.lanes.finished(self.tp, record.offset)
        if upto is not None:
            self.committed.append(upto)


async def _settle() -> None:
    for _ in range(20):  # let the lanes' tasks run what they can
        await asyncio.sleep(0)


async def test_a_batch_fetched_before_a_revoke_is_not_dispatched_after_it() -> None:
    """Fix: a batch B fetched before a revoke was dispatched after ``_on_revoked`` dropped the
    partition's watermark; the partition came back, the consumer re-fetched from the committed
    offset (C < B), and C's records sat behind B in a new watermark: finishing B committed past
    C, unhandled (a kill then loses C). Lanes now drop a batch of a partition revoked since its
    fetch started: revoke, dispatch stale B, dispatch C < B, finish B -> committed stays <= C."""
    from aiokafka import TopicPartition

    from hoptrace.instrumentation.hop.lanes import Lanes

    tp = TopicPartition("t", 0)
    proc = _Gated(tp)
    lanes = Lanes(4, 100, process=proc, pause=lambda _tp: None, resume=lambda _tp: None,
                  stop=asyncio.Event())  # fmt: skip
    proc.lanes = lanes
    fetched_b = lanes.epoch  # B's fetch starts
    await lanes.revoke({tp})  # a rebalance takes the partition away (and gives it back)
    lanes.dispatch(tp, _records(tp, range(10, 15)), fetched_b)  # stale: dropped
    lanes.dispatch(tp, _records(tp, range(5, 10)), lanes.epoch)  # re-fetched from offset 5
    for o in range(10, 15):  # "finish B"
        proc.gate(o).set()
    await _settle()
    assert all(c <= 5 for c in proc.committed), proc.committed
    for o in range(5, 10):
        proc.gate(o).set()
    await _settle()
    assert proc.committed[-1] == 10 and sorted(proc.handled) == list(range(5, 10))
    lanes.cancel()


class _RebalancingConsumer:
    """What the runtime's loop sees of a consumer whose partition is revoked and assigned
    again right after a fetch returned B (the rebalance runs before the loop dispatches B):
    the next getmany returns the records from the committed offset (C < B), then nothing."""

    def __init__(self, rt: HopRuntime, tp) -> None:  # noqa: ANN001
        self.rt, self.tp, self.calls = rt, tp, 0

    async def _rebalance(self) -> None:
        await self.rt._on_revoked({self.tp})
        self.rt.assigned = {self.tp}  # ... and the partition back

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict:
        self.calls += 1
        if self.calls == 1:
            # the coordinator's rebalance gets the loop before the fetch loop resumes with B
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, self._rebalance())
            return {self.tp: _records(self.tp, range(10, 15))}
        if self.calls == 2:
            return {self.tp: _records(self.tp, range(5, 10))}
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    def pause(self, *tps) -> None:  # noqa: ANN002
        pass

    def resume(self, *tps) -> None:  # noqa: ANN002
        pass


@pytest.fixture(params=["plain", "instrumented"])
def aiokafka_instrumented(request: pytest.FixtureRequest) -> Iterator[bool]:
    """aiokafka as it is before and after a process instrumented it (the fetch path differs:
    past the instrumentation's wrapper when the speed-up is on)."""
    from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor

    inst = AIOKafkaInstrumentor()
    was = inst.is_instrumented_by_opentelemetry
    if request.param == "instrumented" and not was:
        inst.instrument()
    elif request.param == "plain" and was:
        inst.uninstrument()
    try:
        yield request.param == "instrumented"
    finally:
        if was != inst.is_instrumented_by_opentelemetry:
            (inst.instrument if was else inst.uninstrument)()


async def test_the_runtime_drops_a_batch_fetched_before_a_rebalance(
    spec: PipelineSpec, aiokafka_instrumented: bool
) -> None:
    """The same race through the runtime's own fetch loop (a consumer stand-in that rebalances
    as the first fetch returns): the committed position never passes C while C is unhandled.
    Found in the full suite: once an earlier test had instrumented aiokafka, the fetch went
    past the wrapper to ``AIOKafkaConsumer.getmany`` itself, not to the stand-in's."""
    from aiokafka import TopicPartition

    topic = spec.step("session.created").consumes
    tp = TopicPartition(topic, 0)
    rt = HopRuntime(
        spec,
        "session.created",
        lambda ctx: None,  # type: ignore[arg-type,return-value]
        HopOptions(bootstrap="127.0.0.1:1", database_url="postgresql://unused", max_lanes=4),
    )
    proc = _Gated(tp)
    proc.lanes = rt.lanes
    rt.lanes._process = proc
    rt._consumer = _RebalancingConsumer(rt, tp)  # type: ignore[assignment]
    loop = asyncio.create_task(rt._loop())
    try:
        await wait_for(lambda: _value(rt._consumer.calls >= 3), timeout=5, what="two fetches")
        for o in range(10, 15):  # finish B (if it was dispatched)
            proc.gate(o).set()
        await _settle()
        assert all(c <= 5 for c in proc.committed), proc.committed
        for o in range(5, 10):
            proc.gate(o).set()
        await wait_for(lambda: _value(bool(proc.committed)), timeout=5, what="C committed")
        assert proc.committed[-1] == 10, proc.committed
    finally:
        rt.request_stop()
        for gate in proc.gates.values():
            gate.set()
        await asyncio.wait_for(loop, 10)
        await rt.producer.stop()


async def _value(v: object) -> object:
    return v


async def test_lanes_survive_real_rebalances_without_loss(
    spec, topics, kafka_bootstrap, db_url
) -> None:
    """Real broker: a second consumer joins the group while records flow (partitions move to
    it), then leaves (they come back). Every record is handled (exactly one row each, the
    ledger turns redeliveries into duplicates) and the committed offsets end at the end."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE TABLE tutoring_sessions (correlation_id text PRIMARY KEY)")
    finally:
        await conn.close()
    step = spec.step("session.created")
    topic = step.consumes

    async def handler(ctx: HopContext) -> None:
        await ctx.conn.execute("INSERT INTO tutoring_sessions VALUES ($1)", ctx.correlation_id)
        await asyncio.sleep(0.003)

    def runtime() -> HopRuntime:
        return HopRuntime(
            spec,
            "session.created",
            handler,
            HopOptions(
                bootstrap=kafka_bootstrap,
                database_url=db_url,
                handle_signals=False,
                commit_interval_s=0.05,
                max_lanes=4,
                lane_buffer=8,
                consumer_opts={"session_timeout_ms": 10000, "heartbeat_interval_ms": 500},
            ),
        )

    total = 0

    async def send(n: int) -> None:
        nonlocal total
        async with HopProducer(kafka_bootstrap) as producer:
            for i in range(total, total + n):
                env = Envelope.new("TRAINER_ALLOCATED", 1, f"rb-{i}", {"i": i})
                await producer._producer.send_and_wait(
                    topic, env.to_bytes(), key=f"rb-{i}".encode(), partition=i % PARTITIONS
                )
        total += n

    async def rows() -> int:
        conn = await asyncpg.connect(db_url)
        try:
            return await conn.fetchval("SELECT count(*) FROM tutoring_sessions")
        finally:
            await conn.close()

    a, b = runtime(), runtime()
    async with running(a):
        await send(60)
        async with running(b):  # joins: a rebalance while a has records in its lanes
            await send(60)
            await wait_for(lambda: _value(b.stats["ok"] > 0), timeout=30, what="b handles some")
            await send(60)
        # b left: its partitions come back to a, from b's committed offsets
        await send(60)
        await wait_for(
            lambda: _value_at_least(rows, total), timeout=60, what="every record handled"
        )
        ends = {p: sum(1 for i in range(total) if i % PARTITIONS == p) for p in range(PARTITIONS)}
        await wait_for(
            lambda: _committed_is(kafka_bootstrap, step.group, topic, ends),
            timeout=30,
            what="offsets committed to the end",
        )
    assert await rows() == total
    assert a.stats["error"] == b.stats["error"] == 0 and a.stats["dead_lettered"] == 0
    assert a.stats["ok"] + b.stats["ok"] == total  # each record's handler committed once


async def _value_at_least(count, n: int) -> bool:  # noqa: ANN001
    return await count() >= n
