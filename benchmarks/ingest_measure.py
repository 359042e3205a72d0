"""Measurement for the ingest benchmark: CPU seconds of processes from /proc (the collector,
Jaeger, every PostgreSQL process), the collector's stored-span counter, the receive-to-queryable
probe, percentiles and medians."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from hoptrace.contract.conventions import ATTR_CORRELATION_ID

PB = {"content-type": "application/x-protobuf"}


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
            a.key, a.value.string_value = ATTR_CORRELATION_ID, cid
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
    """User + system CPU seconds of a process (Linux /proc); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every PostgreSQL process (the server, its backends, its workers)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "postgres":
                    out[int(d.name)] = proc_cpu(int(d.name))
            except OSError:
                continue
    return out


async def other_databases_pids(conn: asyncpg.Connection) -> set[int]:
    """PostgreSQL processes working for other databases than ``conn``'s (other users' backends
    and autovacuum workers on the shared server): left out of a run's PostgreSQL CPU."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname IS NOT NULL "
        "AND datname <> current_database()"
    )
    return {r[0] for r in rows}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


#: Seconds a counter must stay put once the load is done before a run counts as drained (a
#: 20,000-span batch takes longer than a few polls to write).
SETTLE_SECONDS = 1.5


def settled(samples: list[tuple[float, float]], seconds: float = SETTLE_SECONDS) -> bool:
    """Whether the (seconds, count) samples stayed at the last count for ``seconds``."""
    t_last, n = samples[-1]
    if t_last - samples[0][0] < seconds:
        return False
    return all(v == n for t, v in samples if t >= t_last - seconds)


def median(values: list[float]) -> float:
    """The median of the values that are numbers (nan when there is none)."""
    nums = [v for v in values if isinstance(v, (int, float)) and v == v]
    return statistics.median(nums) if nums else float("nan")


async def wait_stored(
    http: httpx.AsyncClient,
    base: str,
    procs: list,
    floor: float,
    timeout: float,
    stop_probe: asyncio.Event | None = None,
) -> list[tuple[float, float]]:
    """Poll the stored counter until the load processes are done and the counter stops moving
    (everything accepted is written); returns (seconds, stored) samples. Latency probes are
    stopped when the load is done."""
    t0 = time.perf_counter()
    samples: list[tuple[float, float]] = []
    while time.perf_counter() - t0 < timeout:
        n = await stored_counter(http, base) - floor
        samples.append((time.perf_counter() - t0, n))
        if all(not p.is_alive() for p in procs):
            if stop_probe is not None:
                stop_probe.set()
            if settled(samples):
                break
        await asyncio.sleep(0.1)
    return samples
