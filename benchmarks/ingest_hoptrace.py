"""The hoptrace peer of the ingest benchmark: a fresh ``hoptrace collector`` process and database
per run, saturated by the load generator, then (optionally) a fixed-rate run with
receive-to-queryable probes.

Reported per run: spans/s stored (``count(*)`` of the table, so stored means queryable), loss
(sent - stored), 503 answers, CPU per span (from /proc) of the collector process, of its
PostgreSQL backends, of PostgreSQL for this run (``pg_cpu_us_per_span``: our backends, autovacuum
of our database, the server's shared processes; other users' databases on the shared server left
out), of all PostgreSQL processes (an upper bound), and of the load generator. ``prepare`` (the
breakdown's experiments) runs on the migrated database before the load; ``env`` overrides the
collector's settings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
from common import create_database, drop_database, free_port, stop_process  # benchmarks/
from ingest_load import collect, start_load
from ingest_measure import (
    other_databases_pids,
    pct,
    postgres_cpu,
    probe_latency,
    proc_cpu,
    stored_counter,
    wait_stored,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
Prepare = Callable[[asyncpg.Connection], Awaitable[None]]


def add_collector_options(ap: argparse.ArgumentParser) -> None:
    """The collector settings :func:`start_collector` reads from the parsed arguments."""
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--queue", type=int, default=50_000)


def start_collector(
    args: argparse.Namespace, db_url: str, tag: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    http_port, grpc_port = free_port(), free_port()
    full = {
        **os.environ,
        "HOPTRACE_DATABASE_URL": db_url,
        "HOPTRACE_OTLP_HTTP_PORT": str(http_port),
        "HOPTRACE_OTLP_GRPC_PORT": str(grpc_port),
        "HOPTRACE_WRITERS": str(args.writers),
        "HOPTRACE_WRITE_BATCH_SPANS": str(args.batch),
        "HOPTRACE_QUEUE_MAX_SPANS": str(args.queue),
        **(env or {}),
    }
    full.pop("HOPTRACE_READY_FILE", None)
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "hoptrace"), "collector"],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=open(RESULTS / f"ingest-collector-{tag}.log", "w"),  # noqa: SIM115
    )
    return proc, http_port


async def _wait_healthy(http: httpx.AsyncClient, base: str) -> None:
    for _ in range(300):
        try:
            if (await http.get(f"{base}/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("collector did not start")


async def _saturation(
    args: argparse.Namespace, http: httpx.AsyncClient, base: str, port: int, pid: int,
    db_url: str, mix: str,
) -> dict:  # fmt: skip
    floor = await stored_counter(http, base)
    conn = await asyncpg.connect(db_url)
    try:
        others = await other_databases_pids(conn)
    finally:
        await conn.close()
    pg0, cpu0 = postgres_cpu(), proc_cpu(pid)
    procs, out = await start_load(port, mix, args.spans, args.workers, args.concurrency)
    samples = await wait_stored(http, base, procs, floor, args.timeout)
    cpu = proc_cpu(pid) - cpu0
    pg1 = postgres_cpu()
    loads = collect(procs, out)
    conn = await asyncpg.connect(db_url)
    try:
        others |= await other_databases_pids(conn)
        backends = {
            r[0]
            for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        }
        stored = await conn.fetchval(
            "SELECT count(*) FROM spans WHERE correlation_id NOT LIKE 'probe-%'"
        )
        completed = await conn.fetchval(
            "SELECT count(*) FROM correlations WHERE state = 'completed'"
        )
    finally:
        await conn.close()
    pg_backend = sum(pg1[p] - pg0.get(p, 0.0) for p in backends if p in pg1)
    pg_all = sum(v - pg0.get(p, 0.0) for p, v in pg1.items())
    # ours: our backends, autovacuum of our database and the server's shared processes (WAL
    # writer, checkpointer...), not what other users' databases cost meanwhile
    pg_ours = sum(v - pg0.get(p, 0.0) for p, v in pg1.items() if p not in others)
    sent = sum(r[0] for r in loads)
    total = samples[-1][1]
    first = next(t for t, n in samples if n > 0)  # the load processes are up
    elapsed = next(t for t, n in samples if n >= total) - first
    lo = next(s for s in samples if s[1] >= 0.2 * total)
    hi = next(s for s in samples if s[1] >= 0.8 * total)
    steady = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else float("nan")
    per = 1e6 / max(stored, 1)
    return {
        "spans_sent": sent,
        "spans_stored": stored,
        "lost": sent - stored,
        "correlations_completed": completed,
        "seconds": round(elapsed, 2),
        "spans_per_s_overall": round(stored / elapsed),
        "spans_per_s_steady": round(steady),
        "refused_503": sum(r[1] for r in loads),
        "collector_cpu_us_per_span": round(cpu * per, 1),
        "pg_backends_cpu_us_per_span": round(pg_backend * per, 1),
        "pg_cpu_us_per_span": round(pg_ours * per, 1),
        # every PostgreSQL process, other users' too (the shared server: an upper bound)
        "pg_all_processes_cpu_us_per_span": round(pg_all * per, 1),
        # the peer's CPU per span: the collector plus PostgreSQL's for this run
        "cpu_us_per_span": round((cpu + pg_ours) * per, 1),
        "load_generator_cpu_us_per_span": round(sum(r[2] for r in loads) * per, 1),
        "collector_cpu_share_of_one_core": round(cpu / elapsed, 2),
        "pg_cpu_share_of_one_core": round(pg_ours / elapsed, 2),
    }


async def _fixed_rate(
    args: argparse.Namespace, http: httpx.AsyncClient, base: str, port: int, db_url: str, mix: str
) -> dict:
    floor = await stored_counter(http, base)
    stop = asyncio.Event()
    probe = asyncio.create_task(probe_latency(base, db_url, stop))
    n = int(args.rate * args.rate_seconds)
    procs, out = await start_load(port, mix, n, args.workers, args.concurrency, rate=args.rate)
    samples = await wait_stored(http, base, procs, floor, args.timeout, stop)
    lat = await probe
    loads = collect(procs, out)
    got = samples[-1][1]
    first = next(t for t, v in samples if v > 0)  # the load processes are up
    done_at = next(t for t, v in samples if v >= got) - first
    refused = sum(r[1] for r in loads)
    return {
        "offered_spans_per_s": args.rate,
        "spans_sent": sum(r[0] for r in loads),
        "spans_stored": round(got),
        "refused_503": refused,
        "stored_spans_per_s": round(got / done_at),
        # kept up: nothing refused and the stored rate within 5% of the offered one
        "kept_up": refused == 0 and got / done_at >= 0.95 * args.rate,
        "latency_probes": len(lat),
        "receive_to_queryable_p50_ms": round(pct(lat, 50) * 1000, 1),
        "receive_to_queryable_p99_ms": round(pct(lat, 99) * 1000, 1),
        "receive_to_queryable_max_ms": round(max(lat) * 1000, 1) if lat else None,
    }


async def hoptrace_run(
    args: argparse.Namespace,
    admin: str,
    mix: str,
    *,
    probes: bool = True,
    tag: str | None = None,
    env: dict[str, str] | None = None,
    prepare: Prepare | None = None,
) -> dict:
    """One saturation run (and with ``probes`` the idle and fixed-rate latency runs) of ``mix``
    against a fresh collector + database."""
    db_url = await create_database(admin)
    proc, port = start_collector(args, db_url, tag or mix, env)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"mix": mix}
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            await _wait_healthy(http, base)
            if prepare is not None:
                conn = await asyncpg.connect(db_url)
                try:
                    await prepare(conn)
                finally:
                    await conn.close()
            idle: list[float] = []
            if probes:
                stop = asyncio.Event()
                idle_probe = asyncio.create_task(probe_latency(base, db_url, stop))
                await asyncio.sleep(3)  # receive-to-queryable with no other load
                stop.set()
                idle = await idle_probe
            result["saturation"] = await _saturation(args, http, base, port, proc.pid, db_url, mix)
            if probes and args.rate:
                result["fixed_rate"] = await _fixed_rate(args, http, base, port, db_url, mix)
            if probes:
                result["idle_receive_to_queryable_p50_ms"] = round(pct(idle, 50) * 1000, 1)
                result["idle_receive_to_queryable_p99_ms"] = round(pct(idle, 99) * 1000, 1)
    finally:
        stop_process(proc)
        await drop_database(admin, db_url)
    return result
