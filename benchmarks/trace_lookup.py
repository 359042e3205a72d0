"""Benchmark: full diagnosis lookups (spans + Kafka + database evidence) on a big store.

Fills a dedicated database with N correlations and ~10 spans each (server-side
``INSERT ... SELECT generate_series`` into the collector's schema, daily partitions), the
reference pipeline's business tables and ``processed_events``; creates the pipeline's topics and
groups on the real Kafka (one live member per group, like running workers); then times
``api.diagnose`` for random correlation ids: 90% completed, 10% failed at trainer.allocated.

    .venv/bin/python benchmarks/trace_lookup.py [--correlations 1000000] [--lookups 2000] [--keep]

Prints the figures and writes ``benchmarks/results/trace_lookup.json``. Bar: p99 <= 50 ms.
Needs the local stack (`hoptrace dev up --infra-only`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from common import create_database, database_url, isolated_spec  # benchmarks/

from hoptrace.collector import schema
from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT, Settings, get_settings
from hoptrace.workers.schema import migrate as migrate_business

RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "trace_lookup.json"
BAR_P99_MS = 50.0
CHUNK = 100_000
DLQ_RECORDS = 20_000


# One correlation c: 4 step spans (k = 0..3) and 6 child spans (k = 4..9, parent = step k % 4).
# Every 10th correlation failed at trainer.allocated (error span, no session.created spans).
SPANS_SQL = """
INSERT INTO spans (trace_id, span_id, parent_span_id, name, service, kind, start_time, end_time,
                   duration_us, status_code, status_message, correlation_id, pipeline, step,
                   outcome, attributes, events)
SELECT md5('t' || c),
       lpad(to_hex(c::bigint * 16 + k), 16, '0'),
       CASE WHEN k >= 4 THEN lpad(to_hex(c::bigint * 16 + (k % 4)), 16, '0') END,
       CASE WHEN k < 4 THEN steps[k + 1] ELSE (ARRAY['send', 'INSERT', 'POST /allocations',
            'INSERT', 'send', 'SELECT'])[k - 3] END,
       services[(k % 4) + 1],
       CASE WHEN k = 0 THEN 4 WHEN k < 4 THEN 5 WHEN k = 6 THEN 3 ELSE 1 END,
       t0 + (c * $3::float8) * interval '1 millisecond' + (k % 4) * interval '40 milliseconds',
       t0 + (c * $3::float8) * interval '1 millisecond' + (k % 4) * interval '40 milliseconds'
          + interval '12 milliseconds',
       12000,
       CASE WHEN failed AND k IN (2, 6) THEN 2 ELSE 1 END,
       CASE WHEN failed AND k = 2 THEN 'gave up after 5 attempts: KeyError: ''course''' END,
       'bench-' || c,
       'payments',
       CASE WHEN k < 4 THEN steps[k + 1] END,
       CASE WHEN k < 4 THEN (CASE WHEN failed AND k = 2 THEN 'error' ELSE 'ok' END) END,
       CASE WHEN k = 0 THEN jsonb_build_object(
                'hoptrace.step', steps[1], 'hoptrace.step.outcome', 'ok',
                'hoptrace.correlation_id', 'bench-' || c,
                'hoptrace.emit.topic', topics[1], 'hoptrace.emit.partition', c % 3,
                'hoptrace.emit.offset', c / 3)
            WHEN k < 4 THEN jsonb_build_object(
                'hoptrace.step', steps[k + 1],
                'hoptrace.step.outcome', CASE WHEN failed AND k = 2 THEN 'error' ELSE 'ok' END,
                'hoptrace.correlation_id', 'bench-' || c,
                'messaging.destination.name', topics[k],
                'messaging.destination.partition.id', (c % 3)::text,
                'messaging.kafka.offset', c / 3,
                'messaging.consumer.group.name', groups[k])
              || CASE WHEN k < 3 AND NOT (failed AND k = 2) THEN jsonb_build_object(
                'hoptrace.emit.topic', topics[k + 1], 'hoptrace.emit.partition', c % 3,
                'hoptrace.emit.offset', c / 3) ELSE '{}'::jsonb END
              || CASE WHEN failed AND k = 2 THEN jsonb_build_object(
                'hoptrace.dlq.topic', topics[2] || '.dlq') ELSE '{}'::jsonb END
            ELSE jsonb_build_object('hoptrace.correlation_id', 'bench-' || c,
                                    'db.system', 'postgresql') END,
       '[]'::jsonb
FROM (SELECT c, (c % 10 = 0) AS failed FROM generate_series($1::int, $2::int) AS c) AS cs,
     generate_series(0, 9) AS k,
     (SELECT ARRAY['payment.confirmed', 'purchase.created', 'trainer.allocated',
                   'session.created'] AS steps,
             ARRAY['payment-service', 'purchase-worker', 'allocation-worker',
                   'session-worker'] AS services,
             $4::text[] AS topics, $5::text[] AS groups,
             now() - interval '30 hours' AS t0) AS consts
WHERE NOT (failed AND (k = 3 OR k = 7))
"""

CORRELATIONS_SQL = """
INSERT INTO correlations (correlation_id, pipeline, state, last_step, last_step_index, failed_step,
                          error, first_seen, updated_at, completed_at, steps)
SELECT 'bench-' || c, 'payments',
       CASE WHEN c % 10 = 0 THEN 'failed' ELSE 'completed' END,
       CASE WHEN c % 10 = 0 THEN 'purchase.created' ELSE 'session.created' END,
       CASE WHEN c % 10 = 0 THEN 1 ELSE 3 END,
       CASE WHEN c % 10 = 0 THEN 'trainer.allocated' END,
       CASE WHEN c % 10 = 0 THEN 'gave up after 5 attempts' END,
       now() - interval '30 hours' + (c * $3::float8) * interval '1 millisecond', now(),
       CASE WHEN c % 10 = 0 THEN NULL ELSE now() END, '{}'::jsonb
FROM generate_series($1::int, $2::int) AS c
"""

BUSINESS_SQL = [
    """INSERT INTO payments (payment_id, correlation_id, student, course, amount, status)
       SELECT 'bench-' || c, 'bench-' || c, 'student-' || (1 + c % 100), 'course-' || (1 + c % 20),
              49, 'succeeded' FROM generate_series($1::int, $2::int) AS c""",
    """INSERT INTO student_course_purchases (correlation_id, payment_id, student, course)
       SELECT 'bench-' || c, 'bench-' || c, 'student-1', 'course-1'
       FROM generate_series($1::int, $2::int) AS c""",
    """INSERT INTO trainer_allocations (correlation_id, student, course, trainer)
       SELECT 'bench-' || c, 'student-1', 'course-1', 'trainer-1'
       FROM generate_series($1::int, $2::int) AS c WHERE c % 10 <> 0""",
    """INSERT INTO tutoring_sessions (correlation_id, student, course, trainer, starts_at)
       SELECT 'bench-' || c, 'student-1', 'course-1', 'trainer-1', now()
       FROM generate_series($1::int, $2::int) AS c WHERE c % 10 <> 0""",
    """INSERT INTO processed_events (event_id, event_type, correlation_id, source)
       SELECT 'evt-' || c || '-' || s, (ARRAY['PURCHASE_CONFIRMED', 'PURCHASE_CREATED',
              'TRAINER_ALLOCATED'])[s], 'bench-' || c,
              (ARRAY['purchase.created', 'trainer.allocated', 'session.created'])[s]
       FROM generate_series($1::int, $2::int) AS c, generate_series(1, 3) AS s
       WHERE NOT (c % 10 = 0 AND s >= 2)""",
]


async def fill(db_url: str, n: int, topics: list[str], groups: list[str]) -> dict[str, float]:
    conn = await asyncpg.connect(db_url)
    took: dict[str, float] = {}
    try:
        await conn.execute("SET synchronous_commit = off")
        await schema.migrate(conn, timedelta(days=3))
        step_ms = 30 * 3600 * 1000 / n  # spread over the last 30 hours (two daily partitions)
        t0 = time.perf_counter()
        for lo in range(1, n + 1, CHUNK):
            hi = min(n, lo + CHUNK - 1)
            await conn.execute(SPANS_SQL, lo, hi, step_ms, topics, groups)
            print(
                f"  spans for correlations {lo}..{hi}: {time.perf_counter() - t0:.0f}s", flush=True
            )
        took["spans_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await conn.execute(CORRELATIONS_SQL, 1, n, step_ms)
        took["correlations_s"] = time.perf_counter() - t0
    finally:
        await conn.close()
    await migrate_business(db_url)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("SET synchronous_commit = off")
        t0 = time.perf_counter()
        for sql in BUSINESS_SQL:
            for lo in range(1, n + 1, CHUNK * 5):
                await conn.execute(sql, lo, min(n, lo + CHUNK * 5 - 1))
        took["business_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")
        took["analyze_s"] = time.perf_counter() - t0
    finally:
        await conn.close()
    return took


async def kafka_setup(bootstrap: str, spec, db_url: str, n: int) -> list[AIOKafkaConsumer]:
    """Topics with records at the offsets the spans name; one live member per group."""
    conn = await asyncpg.connect(db_url)
    try:
        first = await conn.fetchval("SELECT min(start_time) FROM spans")
    finally:
        await conn.close()
    step_ms = 30 * 3600 * 1000 / n
    t0_ms = int(first.timestamp() * 1000) - int(step_ms)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 3, 1) for t in spec.topics])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for step in spec.steps:
            if step.emits:
                for p in range(3):
                    await producer.send_and_wait(step.emits, b"{}", partition=p)
        # dead letters of the failed correlations among the first DLQ_RECORDS ids (keyed by id)
        dlq = spec.step("trainer.allocated").dlq
        for c in range(10, DLQ_RECORDS + 1, 10):
            # timestamped like the failed run (spans start 30 h ago, one correlation per step_ms)
            await producer.send(
                dlq,
                b"{}",
                key=f"bench-{c}".encode(),
                timestamp_ms=t0_ms + int(c * step_ms) + 1000,
                headers=[
                    ("x-correlation-id", f"bench-{c}".encode()),
                    ("x-dlq-reason", b"gave up after 5 attempts: KeyError: 'course'"),
                ],
            )
        await producer.flush()
    finally:
        await producer.stop()
    members = []
    for step in spec.steps:
        if step.consumes:
            c = AIOKafkaConsumer(
                step.consumes,
                bootstrap_servers=bootstrap,
                group_id=step.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await c.start()
            members.append(c)
    for _ in range(200):  # wait for the assignments
        if all(c.assignment() for c in members):
            break
        await asyncio.sleep(0.1)
    for c in members:
        await c.commit({tp: 1 for tp in c.assignment()})
    return members


async def kafka_teardown(bootstrap: str, spec, members: list[AIOKafkaConsumer]) -> None:
    for c in members:
        await c.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(spec.topics)
    finally:
        await admin.close()


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def lookups(settings: Settings, spec, n: int, count: int) -> dict[str, object]:
    from hoptrace.collector import api

    rng = random.Random(42)
    ids = [rng.randint(1, n) for _ in range(count)]
    for cid in ids[:20]:  # warm the pool, the clients and the caches
        await api.diagnose(f"bench-{cid}", settings=settings, spec=spec)
    times: list[float] = []
    causes: dict[str, int] = {}
    sources: dict[str, list[float]] = {}
    cpu0 = time.process_time()
    for cid in ids:
        t0 = time.perf_counter()
        d = await api.diagnose(f"bench-{cid}", settings=settings, spec=spec)
        times.append((time.perf_counter() - t0) * 1000)
        causes[d.cause] = causes.get(d.cause, 0) + 1
        for name, ms in (d.facts.timings_ms if d.facts else {}).items():
            sources.setdefault(name, []).append(ms)
    cpu_ms = (time.process_time() - cpu0) * 1000 / count
    # the unknown-id path
    unknown: list[float] = []
    for i in range(100):
        t0 = time.perf_counter()
        await api.diagnose(f"nope-{i}", settings=settings, spec=spec)
        unknown.append((time.perf_counter() - t0) * 1000)
    await api.close()
    return {
        "lookups": count,
        "p50_ms": round(pct(times, 50), 2),
        "p95_ms": round(pct(times, 95), 2),
        "p99_ms": round(pct(times, 99), 2),
        "max_ms": round(max(times), 2),
        "mean_ms": round(statistics.mean(times), 2),
        "client_cpu_ms_per_lookup": round(cpu_ms, 2),
        "causes": causes,
        "per_source_ms": {
            k: {"n": len(v), "p50": round(pct(v, 50), 2), "p99": round(pct(v, 99), 2)}
            for k, v in sources.items()
        },
        "unknown_id_p50_ms": round(pct(unknown, 50), 2),
        "unknown_id_p99_ms": round(pct(unknown, 99), 2),
    }


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--correlations", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--keep", action="store_true", help="keep the benchmark database")
    ap.add_argument("--reuse", metavar="DBNAME", help="a database kept by --keep: no fill")
    ap.add_argument("--fill-only", action="store_true", help="fill (implies --keep), no lookups")
    args = ap.parse_args()
    args.keep = args.keep or args.fill_only or bool(args.reuse)

    base = get_settings()
    if args.reuse:
        dbname = args.reuse
        suffix = dbname.removeprefix("hoptrace_bench_")
    else:
        suffix = uuid.uuid4().hex[:8]
        dbname = f"hoptrace_bench_{suffix}"
        await create_database(base.database_url, dbname)
    db_url = database_url(base.database_url, dbname)
    spec_path = isolated_spec(Path(tempfile.gettempdir()), suffix)
    spec = load_spec(spec_path)
    topics = [s.consumes or "" for s in spec.steps if s.consumes]
    groups = [s.group or "" for s in spec.steps if s.group]
    settings = Settings(
        database_url=db_url, kafka_bootstrap=base.kafka_bootstrap, pipeline=spec_path
    )
    members: list[AIOKafkaConsumer] = []
    try:
        fill_path = RESULTS.with_name(f"trace_lookup_fill_{suffix}.json")
        if args.reuse:
            filled = json.loads(fill_path.read_text())
            took, fill_s = filled["fill_breakdown_s"], filled["fill_seconds"]
            args.correlations = filled["correlations"]
        else:
            print(f"filling {dbname}: {args.correlations} correlations", flush=True)
            t0 = time.perf_counter()
            took = await fill(db_url, args.correlations, topics, groups)
            fill_s = time.perf_counter() - t0
        conn = await asyncpg.connect(db_url)
        spans = await conn.fetchval("SELECT count(*) FROM spans")
        size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
        await conn.close()
        print(f"{dbname}: {spans} spans, database {size}, filled in {fill_s:.0f}s", flush=True)
        if not args.reuse:
            fill_path.parent.mkdir(parents=True, exist_ok=True)
            fill_path.write_text(
                json.dumps(
                    {
                        "correlations": args.correlations,
                        "fill_seconds": fill_s,
                        "fill_breakdown_s": took,
                    }
                )
            )
        if args.fill_only:
            print(f"kept {dbname}; measure with --reuse {dbname}")
            return 0
        members = await kafka_setup(base.kafka_bootstrap, spec, db_url, args.correlations)
        figures = await lookups(settings, spec, args.correlations, args.lookups)
    finally:
        if members:
            try:
                await kafka_teardown(base.kafka_bootstrap, spec, members)
            except Exception as exc:  # noqa: BLE001
                print(f"kafka teardown: {exc}", file=sys.stderr)
        if not args.keep:
            admin = await asyncpg.connect(base.database_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            await admin.close()
        spec_path.unlink(missing_ok=True)
    result = {
        "benchmark": "trace_lookup",
        "correlations": args.correlations,
        "spans": spans,
        "database_size": size,
        "fill_seconds": round(fill_s, 1),
        "fill_breakdown_s": {k: round(v, 1) for k, v in took.items()},
        "load_average_1m": round(os.getloadavg()[0], 2),
        **figures,
        "bar_p99_ms": BAR_P99_MS,
        "meets_bar": figures["p99_ms"] <= BAR_P99_MS,
        "cpus": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
