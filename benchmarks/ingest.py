"""Collector ingest benchmark.

1. Throughput: a ``hoptrace collector`` process on free ports and a fresh database; load from
   separate worker processes posting OTLP/HTTP protobuf ExportTraceServiceRequests (512 spans =
   128 correlations x 4 step spans with 8 attributes each; the same message the OTel SDK exporter
   sends, produced by patching fresh ids into a pre-encoded request so the generator is not the
   bottleneck). Workers retry 503/429 like an SDK exporter. Reported: sustained spans/s stored,
   loss (sent - stored, by ``count(*)``), and the 503 answers.
2. Receive-to-queryable latency: while the load runs, a probe posts single spans and polls until
   ``spans_for_correlation`` returns them (p50/p99).
3. Stall scan: 1M in-flight correlations (``in_progress``, deadlines spread over the next hour,
   plus 100 overdue); the scan statement timed over repeated runs, each rolled back.

Run: ``.venv/bin/python benchmarks/ingest.py [--spans 600000] [--workers 2]``. JSON goes to
``benchmarks/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["payment.confirmed", "purchase.created", "trainer.allocated", "session.created"]
SERVICES = ["payment-service", "purchase-worker", "allocation-worker", "session-worker"]
PB = {"content-type": "application/x-protobuf"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- load generator (worker side)


def build_template(ncorr: int = 128) -> tuple[bytes, list[tuple[list[int], list[int], list[int]]]]:
    """A pre-encoded request and, per correlation, the byte offsets of its trace id (x4), span
    ids (x4) and correlation id (x4), to patch fresh values in."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    req = ExportTraceServiceRequest()
    now = time.time_ns()
    cids = [uuid.uuid4().hex for _ in range(ncorr)]
    tids = [os.urandom(16) for _ in range(ncorr)]
    sids = [[os.urandom(8) for _ in STEPS] for _ in range(ncorr)]
    for i, (step, svc) in enumerate(zip(STEPS, SERVICES, strict=True)):
        rs = req.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", svc
        ss = rs.scope_spans.add()
        ss.scope.name = "hoptrace"
        for c in range(ncorr):
            sp = ss.spans.add()
            sp.trace_id, sp.span_id = tids[c], sids[c][i]
            sp.name, sp.kind = step, 5
            sp.start_time_unix_nano = now + i * 2_000_000
            sp.end_time_unix_nano = now + i * 2_000_000 + 800_000
            sp.status.code = 1
            for k, v in (
                ("hoptrace.correlation_id", cids[c]),
                ("hoptrace.pipeline", "payments"),
                ("hoptrace.step", step),
                ("hoptrace.step.outcome", "ok"),
                ("messaging.destination.name", "purchase-created"),
                ("messaging.consumer.group.name", svc),
            ):
                a = sp.attributes.add()
                a.key, a.value.string_value = k, v
            for k, n in (
                ("messaging.destination.partition.id", 1),
                ("messaging.kafka.offset", 12345),
            ):
                a = sp.attributes.add()
                a.key, a.value.int_value = k, n
    body = req.SerializeToString()

    def all_at(needle: bytes) -> list[int]:
        out, i = [], body.find(needle)
        while i >= 0:
            out.append(i)
            i = body.find(needle, i + 1)
        return out

    offsets = []
    for c in range(ncorr):
        t_off = all_at(tids[c])
        s_off = [all_at(s)[0] for s in sids[c]]
        c_off = all_at(cids[c].encode())
        assert len(t_off) == 4 and len(c_off) == 4, (len(t_off), len(c_off))
        offsets.append((t_off, s_off, c_off))
    return body, offsets


def fresh(body: bytes, offsets: list[tuple[list[int], list[int], list[int]]]) -> bytes:
    ba = bytearray(body)
    rnd = os.urandom(len(offsets) * (16 + 32 + 16))
    p = 0
    for t_off, s_off, c_off in offsets:
        tid = rnd[p : p + 16]
        sid = rnd[p + 16 : p + 48]
        cid = rnd[p + 48 : p + 64].hex().encode()
        p += 64
        for o in t_off:
            ba[o : o + 16] = tid
        for j, o in enumerate(s_off):
            ba[o : o + 8] = sid[j * 8 : j * 8 + 8]
        for o in c_off:
            ba[o : o + 32] = cid
    return bytes(ba)


def worker(url: str, requests: int, concurrency: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    body, offsets = build_template()

    async def run() -> tuple[int, int]:
        sent = refused = 0
        todo = list(range(requests))
        async with httpx.AsyncClient(timeout=60) as client:

            async def lane() -> None:
                nonlocal sent, refused
                while todo:
                    todo.pop()
                    payload = fresh(body, offsets)
                    while True:
                        r = await client.post(url, content=payload, headers=PB)
                        if r.status_code == 200:
                            sent += 512
                            break
                        if r.status_code in (429, 503):
                            refused += 1
                            await asyncio.sleep(0.05)
                            continue
                        raise RuntimeError(f"unexpected {r.status_code}: {r.text[:200]}")

            await asyncio.gather(*(lane() for _ in range(concurrency)))
        return sent, refused

    out.put(asyncio.run(run()))


# ---------------------------------------------------------------- orchestration


async def stored_counter(http: httpx.AsyncClient, base: str) -> float:
    r = await http.get(f"{base}/metrics")
    for line in r.text.splitlines():
        if line.startswith("hoptrace_spans_stored_total "):
            return float(line.split()[1])
    return 0.0


async def probe_latency(base: str, db_url: str, stop: asyncio.Event) -> list[float]:
    """Single step spans posted every 50ms; time until queryable by correlation id."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from hoptrace.collector import store

    lat: list[float] = []
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    async with httpx.AsyncClient(timeout=30) as http:
        while not stop.is_set():
            cid = "probe-" + uuid.uuid4().hex
            req = ExportTraceServiceRequest()
            rs = req.resource_spans.add()
            kv = rs.resource.attributes.add()
            kv.key, kv.value.string_value = "service.name", "payment-service"
            sp = rs.scope_spans.add().spans.add()
            sp.trace_id, sp.span_id, sp.name = os.urandom(16), os.urandom(8), "probe"
            sp.start_time_unix_nano = sp.end_time_unix_nano = time.time_ns()
            a = sp.attributes.add()
            a.key, a.value.string_value = "hoptrace.correlation_id", cid
            t0 = time.perf_counter()
            while True:
                r = await http.post(
                    f"{base}/v1/traces", content=req.SerializeToString(), headers=PB
                )
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            while not await store.spans_for_correlation(pool, cid, limit=1):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
    await pool.close()
    return lat


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def ingest_phase(args: argparse.Namespace, db_url: str) -> dict:
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOPTRACE_DATABASE_URL": db_url,
        "HOPTRACE_OTLP_HTTP_PORT": str(http_port),
        "HOPTRACE_OTLP_GRPC_PORT": str(grpc_port),
        "HOPTRACE_WRITERS": str(args.writers),
        "HOPTRACE_WRITE_BATCH_SPANS": str(args.batch),
        "HOPTRACE_QUEUE_MAX_SPANS": str(args.queue),
    }
    env.pop("HOPTRACE_READY_FILE", None)
    proc = subprocess.Popen(  # noqa: ASYNC220
        [str(ROOT / ".venv" / "bin" / "hoptrace"), "collector"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(ROOT / "benchmarks" / "results" / "ingest-collector.log", "w"),  # noqa: ASYNC230
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(300):
                try:
                    if (await http.get(f"{base}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("collector did not start")
            per_worker = args.spans // 512 // args.workers
            total = per_worker * args.workers * 512
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
            procs = [
                ctx.Process(
                    target=worker, args=(f"{base}/v1/traces", per_worker, args.concurrency, out)
                )
                for _ in range(args.workers)
            ]
            idle_stop = asyncio.Event()
            idle_probe = asyncio.create_task(probe_latency(base, db_url, idle_stop))
            await asyncio.sleep(5)  # receive-to-queryable with no other load
            idle_stop.set()
            idle_lat = await idle_probe
            stop = asyncio.Event()
            probe = asyncio.create_task(probe_latency(base, db_url, stop))
            cpu0 = proc_cpu(proc.pid)
            t0 = time.perf_counter()
            for p in procs:
                p.start()
            samples: list[tuple[float, float]] = []
            while True:
                n = await stored_counter(http, base)
                samples.append((time.perf_counter() - t0, n))
                if n >= total + len(samples) * 0 and all(not p.is_alive() for p in procs):
                    if n >= total:
                        break
                if time.perf_counter() - t0 > args.timeout:
                    break
                await asyncio.sleep(0.25)
            elapsed = time.perf_counter() - t0
            cpu = proc_cpu(proc.pid) - cpu0
            stop.set()
            lat = await probe
            results = [out.get(timeout=30) for _ in procs]
            for p in procs:
                p.join()
        sent = sum(r[0] for r in results)
        refused = sum(r[1] for r in results)
        conn = await asyncpg.connect(db_url)
        try:
            stored = await conn.fetchval(
                "SELECT count(*) FROM spans WHERE correlation_id NOT LIKE 'probe-%'"
            )
            completed = await conn.fetchval(
                "SELECT count(*) FROM correlations WHERE state = 'completed'"
            )
        finally:
            await conn.close()
        # steady-state rate: stored delta between 20% and 80% of the run's stored count
        lo = next(s for s in samples if s[1] >= 0.2 * total)
        hi = next((s for s in samples if s[1] >= 0.8 * total), samples[-1])
        steady = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else float("nan")
        return {
            "spans_sent": sent,
            "spans_stored": stored,
            "lost": sent - stored,
            "correlations_completed": completed,
            "seconds": round(elapsed, 2),
            "spans_per_s_overall": round(stored / elapsed),
            "spans_per_s_steady": round(steady),
            "refused_503": refused,
            "collector_cpu_seconds": round(cpu, 2),
            "collector_cpu_us_per_span": round(cpu / max(stored, 1) * 1e6, 1),
            "projected_spans_per_s_one_free_core": round(max(stored, 1) / cpu) if cpu else None,
            "idle_receive_to_queryable_p50_ms": round(pct(idle_lat, 50) * 1000, 1),
            "idle_receive_to_queryable_p99_ms": round(pct(idle_lat, 99) * 1000, 1),
            "latency_probes": len(lat),
            "receive_to_queryable_p50_ms": round(pct(lat, 50) * 1000, 1),
            "receive_to_queryable_p99_ms": round(pct(lat, 99) * 1000, 1),
            "receive_to_queryable_max_ms": round(max(lat) * 1000, 1) if lat else None,
            "load_workers": args.workers,
            "concurrency_per_worker": args.concurrency,
            "collector_writers": args.writers,
            "batch_spans": args.batch,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def scan_phase(db_url: str, n: int, runs: int = 50) -> dict:
    from hoptrace.collector import schema
    from hoptrace.collector.stalls import SCAN_SQL

    conn = await asyncpg.connect(db_url)
    try:
        from datetime import timedelta

        await schema.migrate(conn, timedelta(days=1))
        t = time.perf_counter()
        await conn.execute(
            "INSERT INTO correlations (correlation_id, pipeline, state, last_step, last_step_index, "
            "last_step_at, next_step, next_deadline) SELECT 'inflight-' || g, 'payments', 'in_progress', "
            "'purchase.created', 1, now(), 'trainer.allocated', now() + (600 + random() * 3600) * interval '1 second' "
            "FROM generate_series(1, $1) g",
            n,
        )
        load_s = time.perf_counter() - t
        await conn.execute("VACUUM ANALYZE correlations")
        in_flight = await conn.fetchval(
            "SELECT count(*) FROM correlations WHERE state = 'in_progress'"
        )

        async def timed_idle() -> list[float]:
            out = []
            for _ in range(runs):
                t0 = time.perf_counter()
                rows = await conn.fetch(SCAN_SQL, 1000)
                out.append(time.perf_counter() - t0)
                assert rows == [], "nothing should be due"
            return out

        async def timed_fire(due: int) -> list[float]:
            out = []
            for k in range(runs // 2):
                await conn.execute(
                    "UPDATE correlations SET next_deadline = now() - interval '1 second' WHERE correlation_id "
                    "IN (SELECT 'inflight-' || g FROM generate_series($1::int, $2::int) g)",
                    k * due + 1,
                    (k + 1) * due,
                )
                t0 = time.perf_counter()
                rows = await conn.fetch(SCAN_SQL, 1000)
                out.append(time.perf_counter() - t0)
                assert len(rows) == due, len(rows)
            return out

        idle = await timed_idle()
        due = await timed_fire(100)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT correlation_id FROM correlations WHERE state = 'in_progress' "
                "AND next_deadline < now() ORDER BY next_deadline LIMIT 1000"
            )
        )
        fired = await conn.fetchval("SELECT count(*) FROM alerts")
        return {
            "correlations_in_flight": in_flight,
            "load_seconds": round(load_s, 1),
            "scan_nothing_due_p50_ms": round(statistics.median(idle) * 1000, 3),
            "scan_nothing_due_p99_ms": round(pct(idle, 99) * 1000, 3),
            "scan_100_due_fire_p50_ms": round(statistics.median(due) * 1000, 3),
            "scan_100_due_fire_p99_ms": round(pct(due, 99) * 1000, 3),
            "uses_deadline_index": "correlations_deadline_idx" in plan,
            "alerts_fired": fired,
        }
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> dict:
    from hoptrace import devstack

    admin = devstack.StackConfig.from_env().database_url
    name = "hoptrace_bench_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    db_url = admin.rpartition("/")[0] + "/" + name
    out: dict = {"cpu_count": os.cpu_count(), "loadavg_before": os.getloadavg()}
    try:
        if args.spans:
            out["ingest"] = await ingest_phase(args, db_url)
        if args.correlations:
            out["stall_scan"] = await scan_phase(db_url, args.correlations)
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
    out["loadavg_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=600_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--queue", type=int, default=50_000)
    ap.add_argument("--correlations", type=int, default=1_000_000)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "ingest.json").write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
