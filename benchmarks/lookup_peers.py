"""Benchmark: one payment's lookup on hoptrace, Jaeger in-memory and Jaeger with Badger, in one run.

The same OTLP/HTTP requests go to each peer: the ingest benchmark's realistic mix
(:mod:`ingest_load`, 16 spans per payment, one request per service per 96 payments). Each peer
stores all of them, then the same random payment ids are looked up on each over HTTP, as a user
would look a payment up:

- hoptrace: its read API, ``GET /api/v1/correlations/{id}?spans=true`` on a ``hoptrace
  collector`` (the full diagnosis: spans, correlation state, Kafka and database evidence, and the
  spans themselves);
- Jaeger v2 (in-memory, and Badger, its embedded persistent store): its query API's trace search
  by the correlation attribute, ``GET /api/traces?service=payment-service&tags={...}`` (the spans
  only: Jaeger has no diagnosis).

Every answer is checked: one trace, the payment's 16 spans (hoptrace: and the payment's id). A
wrong answer stops the run. The load is also timed (seconds until every span is stored and
queryable), but ``benchmarks/ingest.py`` is the ingest benchmark; this one is about lookups.

    .venv/bin/python benchmarks/lookup_peers.py [--payments 200000] [--lookups 1000]

``--peers hoptrace --ahead 0 --out benchmarks/results/lookup_backlog.json`` is the backlog case:
the payments start when the requests are built, so they are overdue while their spans are still
queued in the load generator (its 503 retries reorder them), as after an outage; the figures
then show the stall scan's alerts (``alerts_fired``: 0 when it holds deadlines while intake is
behind) and what the load kept by tenth.

Prints the figures and writes ``benchmarks/results/lookup_peers.json``. Needs the local stack
(``hoptrace dev up --infra-only``) and Jaeger (``scripts/go-tools.sh jaeger``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
from common import create_database, drop_database, stop_process  # benchmarks/
from ingest_hoptrace import _wait_healthy, add_collector_options, start_collector
from ingest_jaeger import not_built, running_jaeger
from ingest_load import post_accepted, realistic_template
from ingest_measure import pct, postgres_cpu, proc_cpu, stored_counter

from hoptrace.contract import conventions as c_
from hoptrace.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "lookup_peers.json"
PEERS = ("hoptrace", "jaeger_memory", "jaeger_badger")
SPANS_PER_PAYMENT = 16
#: Jaeger's trace search needs a service: the payment's first (its HTTP request).
SEARCH_SERVICE = "payment-service"
#: The load's payments start this far ahead of the clock: the requests are built before the load
#: and it takes minutes, and a payment whose spans claim a past start would be overdue (stalled,
#: diagnosed and alerted by hoptrace's stall scan) while its later spans are still queued in the
#: load generator.
AHEAD_S = 3600
#: A peer's lookups stop after this many seconds even if fewer than ``--lookups`` were made.
LOOKUP_BUDGET_S = 180.0


def build(payments: int, ahead_s: float = AHEAD_S) -> tuple[list[bytes], list[str], int]:
    """The requests for ``payments`` payments, their correlation ids and the span count."""
    template = realistic_template(start_ns=time.time_ns() + int(ahead_s * 10**9))
    bodies: list[bytes] = []
    cids: list[str] = []
    spans = 0
    while len(cids) < payments:
        for body, n in template.fresh():
            bodies.append(body)
            spans += n
        cids += template.last_cids
    return bodies, cids, spans


async def post_all(port: int, bodies: list[bytes], lanes: int = 4) -> int:
    """Every request, over ``lanes`` keep-alive connections (503/429: retried after 50 ms);
    returns the number of refusals."""
    todo = list(reversed(bodies))
    refused = 0

    async def lane() -> None:
        nonlocal refused
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while todo:
                refused += await post_accepted(reader, writer, "/v1/traces", todo.pop())
        finally:
            writer.close()

    await asyncio.gather(*(lane() for _ in range(lanes)))
    return refused


async def load_and_wait(
    port: int,
    bodies: list[bytes],
    total: int,
    stored: Callable[[], Awaitable[float]],
    timeout: float,
) -> dict[str, object]:
    """Post every request and wait until ``stored()`` (the peer's own count of spans written to
    its store) reaches ``total``; the load's seconds, spans/s overall and in each tenth of it
    (how the rate holds up as the store grows), and the refusals."""
    t0 = time.perf_counter()
    poster = asyncio.create_task(post_all(port, bodies))
    samples: list[tuple[float, float]] = []
    while (n := await stored()) < total:
        samples.append((time.perf_counter() - t0, n))
        if poster.done() and poster.exception() is not None:
            raise poster.exception()  # type: ignore[misc]
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{n:.0f} of {total} spans stored after {timeout:.0f}s")
        await asyncio.sleep(0.5)
    load_s = time.perf_counter() - t0
    samples.append((load_s, n))
    refused = await poster

    def rate(lo: float, hi: float) -> int:
        """spans/s between the samples where the stored count crossed lo and hi of the total"""
        a = next(s for s in samples if s[1] >= lo * total)
        b = next(s for s in samples if s[1] >= hi * total)
        return round((b[1] - a[1]) / (b[0] - a[0])) if b[0] > a[0] else 0

    return {
        "load_seconds": round(load_s, 1),
        "load_spans_per_s": round(total / load_s),
        "load_spans_per_s_by_tenth": [rate(i / 10, (i + 1) / 10) for i in range(10)],
        "load_refused": refused,
    }


async def timed_lookups(
    ids: list[str], one: Callable[[str], Awaitable[None]], budget_s: float = LOOKUP_BUDGET_S
) -> dict[str, object]:
    """``await one(cid)`` for each id but the first 20 (warm-up calls, untimed), timed; stops
    after ``budget_s``."""
    for cid in ids[:20]:
        await one(cid)
    times: list[float] = []
    start = time.perf_counter()
    for cid in ids[20:]:
        t0 = time.perf_counter()
        await one(cid)
        times.append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() - start > budget_s:
            break
    return {
        "lookups": len(times),
        "p50_ms": round(pct(times, 50), 2),
        "p95_ms": round(pct(times, 95), 2),
        "p99_ms": round(pct(times, 99), 2),
        "max_ms": round(max(times), 2),
        "mean_ms": round(statistics.mean(times), 2),
    }


async def hoptrace_peer(args: argparse.Namespace, bodies: list[bytes], total: int, ids: list[str]):
    base_url = get_settings().database_url
    db_url = await create_database(base_url, f"hoptrace_lookup_{uuid.uuid4().hex[:8]}")
    proc, port = start_collector(args, db_url, "lookup")
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await _wait_healthy(http, base)
            conn = await asyncpg.connect(db_url)
            try:
                wal0 = await conn.fetchval("SELECT pg_current_wal_lsn()")
            finally:
                await conn.close()
            cpu0, pg0 = proc_cpu(proc.pid), postgres_cpu()
            load = await load_and_wait(
                port, bodies, total, lambda: stored_counter(http, base), args.timeout
            )
            load_cpu, pg1 = proc_cpu(proc.pid) - cpu0, postgres_cpu()
            conn = await asyncpg.connect(db_url)
            try:  # stored means queryable: counted in the table, once (a scan of every span)
                stored = await conn.fetchval("SELECT count(*) FROM spans")
                if stored != total:
                    raise RuntimeError(f"hoptrace stored {stored} of {total} spans")
                wal = await conn.fetchval(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)", wal0
                )
                alerts = await conn.fetchval("SELECT count(*) FROM alerts")
                await conn.execute("VACUUM ANALYZE")
                size = await conn.fetchval("SELECT pg_database_size(current_database())")
            finally:
                await conn.close()

            async def one(cid: str) -> None:
                r = await http.get(f"{base}/api/v1/correlations/{cid}", params={"spans": "true"})
                doc = r.json()
                if r.status_code != 200 or len(doc.get("spans", ())) != SPANS_PER_PAYMENT:
                    raise RuntimeError(
                        f"hoptrace answered {r.status_code} for {cid}: {r.text[:300]}"
                    )
                if doc.get("correlation_id") != cid:
                    raise RuntimeError(f"hoptrace answered another payment for {cid}")

            figures = await timed_lookups(ids, one)
    finally:
        stop_process(proc)
        await drop_database(base_url, db_url)
    return {
        "lookup": "GET /api/v1/correlations/{id}?spans=true (the diagnosis and the spans)",
        **load,
        "collector_cpu_us_per_span": round(load_cpu * 1e6 / total, 1),
        # every PostgreSQL process of the server (an upper bound: other users' work included)
        "postgres_cpu_us_per_span": round(
            sum(v - pg0.get(p, 0.0) for p, v in pg1.items()) * 1e6 / total, 1
        ),
        "wal_bytes_per_span": round(float(wal) / total),
        "alerts_fired": alerts,
        "database_bytes": size,
        **figures,
    }


async def jaeger_peer(
    storage: str, bodies: list[bytes], total: int, ids: list[str], timeout: float
) -> dict[str, object]:
    if (skipped := not_built()) is not None:
        return skipped
    async with running_jaeger(storage, "lookup") as jaeger, httpx.AsyncClient(timeout=60) as http:
        cpu0 = proc_cpu(jaeger.proc.pid)
        load = await load_and_wait(
            jaeger.ports["OTLP_HTTP"], bodies, total, lambda: jaeger.exported(http), timeout
        )
        load_cpu = proc_cpu(jaeger.proc.pid) - cpu0
        now_us = int(time.time() * 1e6)
        hour = 3600 * 10**6
        window = {"start": str(now_us - hour), "end": str(now_us + (AHEAD_S + 3600) * 10**6)}

        async def one(cid: str) -> None:
            tags = json.dumps({c_.ATTR_CORRELATION_ID: cid})
            query = urllib.parse.urlencode(
                {"service": SEARCH_SERVICE, "tags": tags, "limit": "20", **window}
            )
            r = await http.get(f"{jaeger.query}/api/traces?{query}")
            traces = r.json().get("data") or []
            if r.status_code != 200 or len(traces) != 1:
                raise RuntimeError(f"jaeger answered {r.status_code} for {cid}: {r.text[:300]}")
            if len(traces[0]["spans"]) != SPANS_PER_PAYMENT:
                raise RuntimeError(f"jaeger returned {len(traces[0]['spans'])} spans for {cid}")

        figures = await timed_lookups(ids, one)
    return {
        "lookup": f"GET /api/traces?service={SEARCH_SERVICE}&tags={{correlation id}} (the spans)",
        **load,
        "jaeger_cpu_us_per_span": round(load_cpu * 1e6 / total, 1),
        **figures,
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payments", type=int, default=200_000)
    ap.add_argument("--lookups", type=int, default=1000)
    add_collector_options(ap)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to store the load")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    ap.add_argument(
        "--ahead",
        type=float,
        default=AHEAD_S,
        help="the payments start this many seconds after the requests are built (0: a load "
        "that arrives late, as after an outage: payments overdue while their spans are queued)",
    )
    ap.add_argument(
        "--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}"
    )
    args = ap.parse_args()
    peer_names = [p for p in args.peers.split(",") if p]
    if unknown := set(peer_names) - set(PEERS):
        ap.error(f"unknown peer {', '.join(sorted(unknown))}")

    t0 = time.perf_counter()
    bodies, cids, total = build(args.payments, args.ahead)
    print(f"{len(cids)} payments, {total} spans in {len(bodies)} requests "
          f"(built in {time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    ids = random.Random(42).sample(cids, min(args.lookups + 20, len(cids)))
    result: dict[str, object] = {
        "benchmark": "lookup_peers",
        "payments": len(cids),
        "spans": total,
        "mix": "realistic (benchmarks/ingest_trace.py: 16 spans per payment)",
        "note": f"every payment of the load starts at the same time, {args.ahead:g} s after the "
        "requests were built (only ids differ)",
        "cpus": os.cpu_count(),
    }
    peers: dict[str, dict[str, object]] = {}
    for name in peer_names:
        t = time.perf_counter()
        if name == "hoptrace":
            peers[name] = await hoptrace_peer(args, bodies, total, ids)
        else:
            storage = name.removeprefix("jaeger_")
            peers[name] = await jaeger_peer(storage, bodies, total, ids, args.timeout)
        print(f"{name}: {json.dumps(peers[name])} ({time.perf_counter() - t:.0f}s)", flush=True)
    result["peers"] = peers
    ours = peers.get("hoptrace", {})
    for other in PEERS[1:]:
        if "p50_ms" in ours and "p50_ms" in peers.get(other, {}):
            for q in ("p50_ms", "p99_ms"):
                ratio = float(ours[q]) / float(peers[other][q])  # type: ignore[arg-type]
                result[f"{q[:3]}_ratio_hoptrace_to_{other}"] = round(ratio, 3)
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
