"""SIGTERM on a real worker process: the record in hand is finished, its offset committed, the
spans flushed (through OTLP gRPC to an in-test receiver), exit code 0."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from hoptrace.contract import conventions as c
from hoptrace.instrumentation import Envelope, HopProducer
from hoptrace.settings import PROJECT_ROOT

from ..support import unique, wait_for
from .helpers import committed, fetchval, read_topic
from .otlp_receiver import GrpcReceiver


async def _line(proc: asyncio.subprocess.Process, prefix: str, timeout: float = 30.0) -> str:
    async def read() -> str:
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError(f"worker exited before printing {prefix!r}")
            line = raw.decode().strip()
            if line.startswith(prefix):
                return line

    return await asyncio.wait_for(read(), timeout)


async def test_sigterm_finishes_commits_and_flushes(
    spec, topics, tables, hoptrace_env, kafka_bootstrap
):
    db_url = tables
    step = spec.step("purchase.created")
    cid = unique("pay-")
    with GrpcReceiver() as receiver:
        env = {**hoptrace_env, "TEST_OTLP_ENDPOINT": receiver.endpoint, "TEST_HANDLER_SLEEP": "1.5"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.instrumentation.sigterm_worker",
            cwd=PROJECT_ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            await _line(proc, "READY")
            async with HopProducer(kafka_bootstrap) as producer:
                await producer.emit(
                    step.consumes, Envelope.new("PURCHASE_CONFIRMED", 1, cid, {"payment_id": cid})
                )
            await _line(proc, "HANDLING")
            proc.send_signal(signal.SIGTERM)  # mid-record
            exited = await _line(proc, "EXITED")
            rc = await asyncio.wait_for(proc.wait(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert rc == 0
        assert "'ok': 1" in exited
        # the record in hand was finished: row + mark committed, next event emitted, offset committed
        assert await fetchval(db_url, "SELECT count(*) FROM student_course_purchases") == 1
        assert await fetchval(db_url, "SELECT count(*) FROM processed_events") == 1
        out = await read_topic(kafka_bootstrap, step.emits, 1)
        assert json.loads(out[0].value)["correlation_id"] == cid
        assert sum((await committed(kafka_bootstrap, step.group, step.consumes)).values()) == 1
        # spans were batched for 60 s: only the shutdown flush can have delivered them
        await wait_for(
            lambda: _named(receiver, "purchase.created"), timeout=5, what="flushed spans"
        )
        span = receiver.received.named("purchase.created")[0]
        assert span.attributes[c.ATTR_OUTCOME] == "ok"
        assert span.attributes[c.ATTR_CORRELATION_ID] == cid
        assert span.service == "sigterm-worker"


async def _named(receiver: GrpcReceiver, name: str) -> bool:
    return bool(receiver.received.named(name))
