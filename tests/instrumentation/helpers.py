"""Helpers for the instrumentation tests: topics, a runtime running in the background, reading
what landed in a topic, committed offsets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from hoptrace.contract import PipelineSpec
from hoptrace.instrumentation._accel import Speedup, why_off
from hoptrace.instrumentation.hop import Handler, HopOptions, HopRuntime

from ..support import wait_for


def accel_only(speedup: Speedup) -> pytest.MarkDecorator:
    """For a test of what ``speedup`` installs: skipped when this process runs without it
    (``HOPTRACE_ACCEL=0`` or an untested library version)."""
    return pytest.mark.skipif(why_off(speedup) is not None, reason=f"{speedup} is off here")


def plain_process(check: str) -> None:
    """Run ``check`` (Python statements with asserts) in a child process with
    ``HOPTRACE_ACCEL=0``, after ``configure_tracing`` there: the plain path, which a test process
    with the speed-ups on cannot switch to (its tracer provider is fixed once set)."""
    code = (
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "from hoptrace.instrumentation.tracing import configure_tracing, get_tracer\n"
        "configure_tracing('plain-check', exporter=InMemorySpanExporter(), simple=True)\n"
        f"{check}\n"
        "print('plain-ok')\n"
    )
    env = {**os.environ, "HOPTRACE_ACCEL": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "plain-ok" in proc.stdout, proc.stdout + proc.stderr


TABLES = """
CREATE TABLE IF NOT EXISTS student_course_purchases (correlation_id text PRIMARY KEY, amount int);
CREATE TABLE IF NOT EXISTS trainer_allocations (correlation_id text PRIMARY KEY, trainer text);
CREATE TABLE IF NOT EXISTS tutoring_sessions (correlation_id text PRIMARY KEY);
"""


def runtime(
    spec: PipelineSpec,
    handler: Handler,
    kafka_bootstrap: str,
    db_url: str,
    *,
    step: str = "purchase.created",
    **kw: Any,
) -> HopRuntime:
    """A HopRuntime for ``step`` (purchase.created by default) without signal handlers."""
    kw.setdefault("handle_signals", False)
    collaborators = {
        k: kw.pop(k) for k in ("producer", "hooks", "effect_check", "validate") if k in kw
    }
    options = HopOptions(bootstrap=kafka_bootstrap, database_url=db_url, **kw)
    return HopRuntime(spec, step, handler, options, **collaborators)


async def create_tables(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(TABLES)
    finally:
        await conn.close()


async def fetchval(db_url: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running(runtime: HopRuntime, timeout: float = 30.0) -> AsyncIterator[asyncio.Task]:
    """Run ``runtime`` in a task until the block ends; waits for its partition assignment."""
    task = asyncio.create_task(runtime.run())
    ready = asyncio.create_task(runtime.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=timeout, return_when="FIRST_COMPLETED")
    if task in done:
        ready.cancel()
        task.result()  # raises what run() raised
        raise AssertionError("runtime returned before it was ready")
    if ready not in done:
        ready.cancel()
        task.cancel()
        raise AssertionError("runtime not ready in time")
    try:
        yield task
    finally:
        await runtime.stop()
        if not task.done():
            await asyncio.wait_for(task, timeout=timeout)


async def read_topic(
    bootstrap: str, topic: str, n: int, timeout: float = 20.0
) -> list[ConsumerRecord]:
    """Wait until ``topic`` holds at least ``n`` records and return them all (no group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await wait_for(
            lambda: _partitions(consumer, topic), timeout=timeout, what=f"{topic} metadata"
        )
        tps = [TopicPartition(topic, p) for p in sorted(parts)]  # type: ignore[union-attr]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[ConsumerRecord] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < n and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
        if len(out) < n:
            raise AssertionError(f"{topic}: expected {n} record(s), got {len(out)}")
        # anything more that is already there
        batch = await consumer.getmany(timeout_ms=300)
        for recs in batch.values():
            out.extend(recs)
        return out
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int] | None:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or None


async def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> dict[int, int]:
    """The group's committed offsets per partition (only partitions with a commit)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        out = {}
        for p in range(partitions):
            off = await consumer.committed(TopicPartition(topic, p))
            if off is not None:
                out[p] = off
        return out
    finally:
        await consumer.stop()


def header(record: ConsumerRecord, key: str) -> str | None:
    for k, v in record.headers or ():
        if k == key:
            return v.decode() if v is not None else None
    return None
