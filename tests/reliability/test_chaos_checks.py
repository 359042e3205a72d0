"""The chaos run's duplicate checks can fail: a second handler execution (two processed marks
for one payment at one step, or two step spans with outcome ``ok``) and a second emitted event
(two distinct event ids for one payment on one topic) are found, on the real PostgreSQL and
Kafka; a re-sent copy of the same event is counted but is no duplicate. (The business tables'
``correlation_id UNIQUE`` makes a row count unable to see any of these.)"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import pytest

from hoptrace.contract import load_spec
from hoptrace.instrumentation.envelope import Envelope
from hoptrace.instrumentation.producer import HopProducer
from tests.support import create_topics, delete_topics
from tests.workers.harness import HOPTRACE

ROOT = Path(__file__).resolve().parents[2]


def _chaos():  # noqa: ANN202
    if str(ROOT / "benchmarks") not in sys.path:  # the benchmark imports its sibling `common`
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("chaos_bench", ROOT / "benchmarks" / "chaos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def topics(kafka_bootstrap: str, spec_path: Path):  # noqa: ANN201
    names = sorted(load_spec(spec_path).topics)
    asyncio.run(create_topics(kafka_bootstrap, names))
    yield names
    asyncio.run(delete_topics(kafka_bootstrap, names))


async def test_second_executions_and_second_events_are_found(
    db_url: str, kafka_bootstrap: str, spec_path: Path, topics: list[str]
) -> None:
    chaos = _chaos()
    spec = load_spec(spec_path)
    res = await asyncio.to_thread(
        subprocess.run,
        [HOPTRACE, "migrate"],
        env={"PATH": "", "HOPTRACE_DATABASE_URL": db_url, "HOPTRACE_PIPELINE": str(spec_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    universe = ["dup-1", "dup-2", "fine-1"]
    conn = await asyncpg.connect(db_url)
    try:
        marks = [
            ("e1", "dup-1", "purchase.created"),
            ("e2", "dup-1", "purchase.created"),  # a second event handled for dup-1
            ("e3", "dup-2", "purchase.created"),
            ("e4", "fine-1", "purchase.created"),
        ]
        await conn.executemany(
            "INSERT INTO processed_events (event_id, event_type, correlation_id, source) "
            "VALUES ($1, 'PURCHASE_CONFIRMED', $2, $3)",
            marks,
        )
        for n, (cid, step) in enumerate([("dup-2", "trainer.allocated")] * 2):
            await conn.execute(
                "INSERT INTO spans (trace_id, span_id, name, service, start_time, end_time, "
                "duration_us, step, outcome, correlation_id) "
                "VALUES ($1, $2, $3, 'allocation-worker', now(), now(), 0, $3, 'ok', $4)",
                f"t{n}",
                f"s{n}",
                step,
                cid,
            )
    finally:
        await conn.close()
    topic = spec.step("purchase.created").emits
    async with HopProducer(kafka_bootstrap) as producer:
        first = Envelope.new("PURCHASE_CREATED", 1, "fine-1", {})
        for env in (
            first,
            first,  # a re-sent copy: at-least-once, not a duplicate
            Envelope.new("PURCHASE_CREATED", 1, "dup-1", {}),
            Envelope.new("PURCHASE_CREATED", 1, "dup-1", {}),  # a second event for dup-1
        ):
            await producer._producer.send_and_wait(topic, env.to_bytes())

    stack = SimpleNamespace(
        database_url=db_url, cfg=SimpleNamespace(kafka_bootstrap=kafka_bootstrap)
    )
    runs = await chaos.handler_executions(stack, universe, spec)
    assert runs["purchase.created"]["marked_twice"] == ["dup-1"]
    assert runs["purchase.created"]["not_marked"] == []
    assert runs["trainer.allocated"]["ok_spans_twice"] == ["dup-2"]
    assert "payment.confirmed" not in runs  # a producer step: re-sends are allowed
    events = await chaos.emitted_events(stack, universe, spec)
    created = events[topic]
    assert created["twice"] == ["dup-1"] and created["resent_copies"] == 1
    assert created["missing"] == ["dup-2"] and created["records"] == 4
    assert events[spec.step("purchase.created").consumes]["missing"] == universe  # nothing sent
    dlq = f"{spec.step('purchase.created').consumes}.dlq"
    assert events[dlq] == {"records": 0}
