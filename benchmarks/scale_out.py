"""Scale-out benchmark: one collector against two in one consumer group on the Kafka span topic,
then two with one SIGKILLed mid-run, each against one fresh PostgreSQL database.

Why: the Kafka span source is hoptrace's scale-out path (a group of ``hoptrace collector``
replicas shares the span topic's partitions and one store; one of them leads the stall scan). This
measures what a second replica buys on this machine and what happens when one dies.

1. Pre-load one span topic (``--partitions``, default 6) with realistic OTLP batches: the
   reference pipeline's real span mix from :mod:`ingest` (16 spans per payment, 4 step spans;
   one ``ExportTraceServiceRequest`` per service per round of ``--round`` payments, as an
   OpenTelemetry Collector's Kafka exporter writes them), spread round-robin over the partitions.
2. Per run, a new consumer group reads the whole topic from the start into a new database:
   ``one`` (one collector), ``two`` (two collectors, one group), ``kill`` (two, and the stall-scan
   leader is SIGKILLed once ``--kill-at`` of the spans are stored).
   Reported per run: spans/s stored (steady: between 10% and 90% of the spans, from when every
   collector is assigned partitions; overall: first span to last), CPU per span of the
   collector processes and of this database's PostgreSQL backends (from /proc), the cluster's WAL
   bytes per span (shared with whatever else runs: an upper bound), stored == sent (``lost``),
   duplicates from redelivery (``hoptrace_spans_duplicate_total``), payments whose correlation
   row lacks a step that was sent (must be 0). ``kill`` adds the time until the survivor holds the
   stall-scan lease (``takeover_s``) and until the group has rebalanced onto it (``rebalance_s``).

On a 2-core machine the collectors, PostgreSQL and Kafka share the same cores: a second collector
cannot double spans/s here; CPU per span says what it costs wherever it runs.

Run: ``.venv/bin/python benchmarks/scale_out.py [--payments 30000]``; JSON to
``benchmarks/results/scale_out.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from common import create_database, drop_database, isolated_spec  # benchmarks/
from ingest_load import realistic_template  # benchmarks/
from ingest_measure import pct, proc_cpu  # benchmarks/
from otlp_fuzz import CollectorProc  # benchmarks/

from hoptrace import devstack
from hoptrace.collector.kafka_facts import assigned

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: Every step of the reference pipeline done (``correlations.done_mask``, bit i = step i).
ALL_STEPS = 0b1111
SAMPLE_S = 0.2


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy since boot (``/proc/stat``): with the
    runs' own CPU, says whether other work took the cores meanwhile."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def preload(bootstrap: str, topic: str, partitions: int, payments: int, round_: int) -> dict:
    """Create ``topic`` and write ``payments`` payments' spans into it; what was sent."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    template = realistic_template(round_)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_request_size=4 << 20, linger_ms=5, acks="all"
    )
    await producer.start()
    spans = records = size = 0
    t0 = time.perf_counter()
    try:
        pending = []
        for _ in range(payments // round_):
            for body, k in template.fresh():
                pending.append(await producer.send(topic, body, partition=records % partitions))
                spans, records, size = spans + k, records + 1, size + len(body)
            if len(pending) > 200:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return {
        "topic": topic,
        "partitions": partitions,
        "payments": payments // round_ * round_,
        "spans": spans,
        "records": records,
        "bytes": size,
        "spans_per_record": round(spans / records, 1),
        "preload_s": round(time.perf_counter() - t0, 2),
    }


class Run:
    """One run: collectors on a new group and database, sampled until every span is stored."""

    def __init__(self, args: argparse.Namespace, admin_url: str, sent: dict, mode: str) -> None:
        self.args, self.admin_url, self.sent, self.mode = args, admin_url, sent, mode
        self.n = 1 if mode == "one" else 2
        self.group = f"hoptrace-scale-{mode}-{uuid.uuid4().hex[:8]}"
        self.db_url = ""
        self.procs: list[CollectorProc] = []
        self.cpu: dict[int, float] = {}  # last CPU seconds seen per collector pid
        self.cpu0: dict[int, float] = {}
        self.backend_cpu: dict[int, float] = {}  # last CPU seconds per PostgreSQL backend pid
        self.stored: dict[int, float] = {}  # last hoptrace_spans_stored_total per collector pid
        self.dups: dict[int, float] = {}
        self.timeline: list[tuple[float, float]] = []  # (s since launch, spans stored)
        self.busy: list[float] = []  # machine_busy_s() at each sample
        self.members_at: float | None = None  # every collector assigned partitions (s)
        self.t0 = 0.0
        self.killed: CollectorProc | None = None
        self.killed_at = 0.0
        self.takeover_s: float | None = None
        self.rebalance_s: float | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def _backends(self, conn: asyncpg.Connection) -> None:
        name = self.db_url.rpartition("/")[2]
        me = await conn.fetchval("SELECT pg_backend_pid()")
        for r in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name):
            if r["pid"] != me:
                cpu = proc_cpu(r["pid"])  # since it connected (the migration's share is small)
                if cpu:
                    self.backend_cpu[r["pid"]] = cpu

    async def _sample(self, http: httpx.AsyncClient, conn: asyncpg.Connection) -> None:
        for p in self.procs:
            if p is self.killed or p.proc is None:
                continue
            pid = p.proc.pid
            try:
                text = (await http.get(f"{p.http}/metrics")).text
            except httpx.HTTPError:
                continue
            self.stored[pid] = _metric(text, "hoptrace_spans_stored_total")
            self.dups[pid] = _metric(text, "hoptrace_spans_duplicate_total")
            self.cpu[pid] = proc_cpu(pid) or self.cpu.get(pid, 0.0)
        await self._backends(conn)
        self.timeline.append((self.now(), sum(self.stored.values())))
        self.busy.append(machine_busy_s())

    async def _group(self, kafka: AIOKafkaAdminClient) -> list[tuple[int, ...]]:
        members = assigned(await kafka.describe_consumer_groups([self.group]), self.sent["topic"])
        return [m.partitions for m in members]

    async def _watch_group(self, kafka: AIOKafkaAdminClient, stop: asyncio.Event) -> None:
        """When every collector (and, after the kill, the survivor alone) holds partitions."""
        while not stop.is_set():
            try:
                parts = await self._group(kafka)
            except Exception:  # noqa: BLE001 - a coordinator moving: ask again
                parts = []
            total = sum(len(p) for p in parts)
            if self.members_at is None and len(parts) == self.n:
                self.members_at = self.now()
            if self.killed is not None and self.rebalance_s is None:
                if len(parts) == 1 and total == self.sent["partitions"]:
                    self.rebalance_s = round(time.perf_counter() - self.killed_at, 2)
            await asyncio.sleep(0.25)

    async def _watch_lease(self, survivor: CollectorProc) -> None:
        """Until the survivor holds the stall-scan lease (on a connection of its own)."""
        assert survivor.proc is not None
        mark = f":{survivor.proc.pid}:"
        conn = await asyncpg.connect(self.db_url)
        try:
            while self.takeover_s is None:
                leader = await conn.fetchval("SELECT leader FROM stall_scan WHERE id = 1")
                if leader and mark in leader:
                    self.takeover_s = round(time.perf_counter() - self.killed_at, 2)
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def _kill_leader(self, conn: asyncpg.Connection) -> asyncio.Task[None]:
        leader = await conn.fetchval("SELECT leader FROM stall_scan WHERE id = 1") or ""
        victim = next(p for p in self.procs if p.proc and f":{p.proc.pid}:" in leader)
        survivor = next(p for p in self.procs if p is not victim)
        assert victim.proc is not None
        self.cpu[victim.proc.pid] = proc_cpu(victim.proc.pid)
        await self._backends(conn)
        self.killed, self.killed_at = victim, time.perf_counter()
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        print(f"  killed the stall-scan leader (pid {victim.proc.pid}) at {self.now():.1f}s")
        return asyncio.create_task(self._watch_lease(survivor))

    async def execute(self) -> dict:
        args, sent = self.args, self.sent
        workdir = RESULTS / "scale_out" / self.mode
        workdir.mkdir(parents=True, exist_ok=True)
        spec = isolated_spec(workdir, uuid.uuid4().hex[:6])
        # deadlines past the run: a backlog drained out of order stalls nothing
        spec.write_text(re.sub(r'deadline = "[^"]+"', 'deadline = "1h"', spec.read_text()))
        self.db_url = await create_database(self.admin_url)
        env = {
            "HOPTRACE_SPAN_TOPIC": sent["topic"],
            "HOPTRACE_SPAN_GROUP": self.group,
            "HOPTRACE_KAFKA_BOOTSTRAP": args.bootstrap,
        }
        for i in range(self.n):
            (workdir / str(i)).mkdir(exist_ok=True)
            (workdir / str(i) / "collector.log").unlink(missing_ok=True)
            self.procs.append(CollectorProc(self.db_url, spec, workdir / str(i), extra_env=env))
        conn = await asyncpg.connect(self.db_url)
        kafka = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap)
        await kafka.start()
        stop = asyncio.Event()
        lease_task: asyncio.Task[None] | None = None
        wal0 = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        try:
            self.t0 = time.perf_counter()
            await asyncio.gather(*(asyncio.to_thread(p.start) for p in self.procs))
            for p in self.procs:
                assert p.proc is not None
                self.cpu0[p.proc.pid] = proc_cpu(p.proc.pid)
            group_task = asyncio.create_task(self._watch_group(kafka, stop))
            total = sent["spans"]
            done_at = None
            counted = 0.0
            async with httpx.AsyncClient(timeout=5) as http:
                while self.now() < args.timeout:
                    await self._sample(http, conn)
                    stored = self.timeline[-1][1]
                    if (
                        self.mode == "kill"
                        and self.killed is None
                        and self.members_at is not None
                        and stored >= args.kill_at * total
                    ):
                        lease_task = await self._kill_leader(conn)
                    near = stored >= total or (self.killed and stored >= 0.5 * total)
                    if near and self.now() - counted >= 1.0:  # count(*) is not free: 1/s
                        counted = self.now()
                        if await conn.fetchval("SELECT count(*) FROM spans") >= total:
                            done_at = self.now()
                            break
                    await asyncio.sleep(SAMPLE_S)
                await self._sample(http, conn)
            if lease_task is not None:
                await asyncio.wait_for(lease_task, 30)
            stop.set()
            await group_task
            wal1 = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
            wal = await conn.fetchval(
                "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)", wal1, wal0
            )
            return await self._report(conn, done_at, float(wal))
        finally:
            stop.set()
            for p in self.procs:
                if p is not self.killed:
                    p.stop()
            await kafka.close()
            await conn.close()
            await drop_database(self.admin_url, self.db_url)

    def _at(self, level: float) -> float:
        """Seconds since launch when the stored count first reached ``level``."""
        return next((t for t, n in self.timeline if n >= level), self.timeline[-1][0])

    async def _report(self, conn: asyncpg.Connection, done_at: float | None, wal: float) -> dict:
        total, pays = self.sent["spans"], self.sent["payments"]
        stored_rows = await conn.fetchval("SELECT count(*) FROM spans")
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE state = 'completed') AS completed, "
            "count(*) FILTER (WHERE done_mask IS DISTINCT FROM $1) AS lacking FROM correlations",
            ALL_STEPS,
        )
        span_bytes = await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
            "WHERE inhparent = 'spans'::regclass"
        )
        corr_bytes = await conn.fetchval("SELECT pg_total_relation_size('correlations')")
        first = self._at(1)
        i0 = next(i for i, (t, _) in enumerate(self.timeline) if t >= first)
        machine = (self.busy[-1] - self.busy[i0]) / (self.timeline[-1][0] - first)
        end = done_at if done_at is not None else self.timeline[-1][0]
        lo = max(self._at(0.1 * total), self.members_at or 0.0)
        hi = self._at(0.9 * total)
        n_lo = next(n for t, n in self.timeline if t >= lo)
        steady = (0.9 * total - n_lo) / (hi - lo) if hi > lo else float("nan")
        collector_cpu = sum(self.cpu[p] - self.cpu0.get(p, 0.0) for p in self.cpu)
        backend_cpu = sum(self.backend_cpu.values())
        out: dict[str, Any] = {
            "collectors": self.n,
            "group": self.group,
            "completed": done_at is not None,
            "spans_sent": total,
            "spans_stored": stored_rows,
            "lost": total - stored_rows,
            "duplicates": int(sum(self.dups.values())),
            "payments_sent": pays,
            "correlation_rows": row["n"],
            "payments_completed": row["completed"],
            # a payment with no row at all lacks every step it sent
            "payments_lacking_a_sent_step": row["lacking"] + max(0, pays - row["n"]),
            "all_assigned_after_s": round(self.members_at - first, 2)
            if self.members_at is not None
            else None,
            "drain_s": round(end - first, 2),
            "spans_per_s_overall": round(total / (end - first)),
            "spans_per_s_steady": round(steady),
            "steady_window_s": [round(lo - first, 2), round(hi - first, 2)],
            "cpu_s_collectors": round(collector_cpu, 2),
            "cpu_s_pg_backends": round(backend_cpu, 2),
            "cpu_us_per_span_collectors": round(collector_cpu / total * 1e6, 1),
            "cpu_us_per_span_pg_backends": round(backend_cpu / total * 1e6, 1),
            "cpu_us_per_span_total": round((collector_cpu + backend_cpu) / total * 1e6, 1),
            "wal_bytes_per_span_cluster_wide": round(wal / total),
            # busy cores over the drain: below the machine's, the run waited on something else
            "cores_busy_collectors": round(collector_cpu / (end - first), 2),
            "cores_busy_pg_backends": round(backend_cpu / (end - first), 2),
            "cores_busy_machine": round(machine, 2),  # everything, other work included
            "stored_bytes_per_span": round(span_bytes / total),  # table + indexes
            "correlation_bytes_per_payment": round(corr_bytes / max(1, row["n"])),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "per_collector_stored": [int(v) for v in self.stored.values()],
        }
        if self.mode == "kill" and self.killed is not None:
            gaps = [b[0] - a[0] for a, b in zip(self.timeline, self.timeline[1:], strict=False)]
            out |= {
                "killed_at_s": round(self.killed_at - self.t0 - first, 2),
                "killed_at_stored_fraction": self.args.kill_at,
                "takeover_s": self.takeover_s,
                "rebalance_s": self.rebalance_s,
                "sample_gap_p99_s": round(pct(gaps, 99), 3),
            }
        return out


def table(result: dict) -> str:
    rows = [
        ("collectors", "collectors"),
        ("spans/s steady", "spans_per_s_steady"),
        ("spans/s overall", "spans_per_s_overall"),
        ("drain s", "drain_s"),
        ("CPU µs/span collectors", "cpu_us_per_span_collectors"),
        ("CPU µs/span PG backends", "cpu_us_per_span_pg_backends"),
        ("CPU µs/span total", "cpu_us_per_span_total"),
        ("cores busy collectors", "cores_busy_collectors"),
        ("cores busy PG backends", "cores_busy_pg_backends"),
        ("cores busy machine", "cores_busy_machine"),
        ("WAL B/span (cluster)", "wal_bytes_per_span_cluster_wide"),
        ("stored B/span", "stored_bytes_per_span"),
        ("spans lost", "lost"),
        ("duplicates", "duplicates"),
        ("payments lacking a step", "payments_lacking_a_sent_step"),
        ("takeover s", "takeover_s"),
        ("rebalance s", "rebalance_s"),
    ]
    modes = [m for m in ("one", "two", "kill") if m in result["runs"]]
    lines = [f"{'':26}" + "".join(f"{m:>12}" for m in modes)]
    for label, key in rows:
        vals = [result["runs"][m].get(key, "") for m in modes]
        lines.append(f"{label:26}" + "".join(f"{'' if v is None else v:>12}" for v in vals))
    return "\n".join(lines)


def save(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_out.json").write_text(json.dumps(result, indent=2) + "\n")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def main_async(args: argparse.Namespace) -> dict:
    cfg = devstack.StackConfig.from_env()
    admin_url = cfg.database_url
    args.bootstrap = args.bootstrap or cfg.kafka_bootstrap
    result: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "uptime_before": uptime(),
        "span_mix": f"realistic (benchmarks/ingest.py REAL_TRACE: 16 spans per payment, one "
        f"request per service per round of {args.round} payments)",
        "note": "collectors, PostgreSQL and Kafka share this machine's cores (and other work "
        "ran beside it): two collectors cannot double spans/s here; CPU per span is what a "
        "span costs wherever it runs. WAL bytes are the whole cluster's (an upper bound).",
        "runs": {},
    }
    topic = f"hoptrace-scale-spans-{uuid.uuid4().hex[:8]}"
    try:
        sent = await preload(args.bootstrap, topic, args.partitions, args.payments, args.round)
        result["preload"] = sent
        print(
            f"preloaded {sent['spans']} spans in {sent['records']} records ({sent['preload_s']}s)"
        )
        for mode in args.modes.split(","):
            print(f"run {mode} ...")
            result["runs"][mode] = await Run(args, admin_url, sent, mode).execute()
            print(json.dumps(result["runs"][mode]))
            save(result)
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
    runs = result["runs"]
    if "one" in runs and "two" in runs:
        result["two_to_one_steady_ratio"] = round(
            runs["two"]["spans_per_s_steady"] / runs["one"]["spans_per_s_steady"], 2
        )
    result["uptime_after"] = uptime()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payments", type=int, default=30_000)
    ap.add_argument("--round", type=int, default=48, help="payments per request round")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--modes", default="one,two,kill")
    ap.add_argument("--kill-at", type=float, default=0.4, help="stored fraction at the kill")
    ap.add_argument("--bootstrap", default=None, help="Kafka (default: the local stack's)")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    save(result)
    print(table(result))
    print(result["uptime_after"])
    sys.exit(0 if all(r["lost"] == 0 for r in result["runs"].values()) else 1)


if __name__ == "__main__":
    main()
