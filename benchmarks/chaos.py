"""Chaos run: payments at a steady rate through the reference pipeline on a PRIVATE local stack
(its own PostgreSQL, Kafka, collector and services, on free ports, under
``.hoptrace/chaos/<pid>``) while a seeded scheduler SIGKILLs random services (the workers,
admin-service, payment-service and the collector) and restarts them, restarts the Kafka broker
once, stops the collector for a while, restarts PostgreSQL once and holds session-worker down
past its deadline once (so some payments are delayed for sure). The load retries a failed
request with the same ``Idempotency-Key`` (a retry is never a second payment). Afterwards it
waits (bounded) for the pipeline to drain and checks:

- every payment has exactly one row in each business table (lost / duplicated rows);
- every consuming step ran its handler to a commit exactly once per payment (its processed
  mark, and at most one step span with outcome ``ok``), and every step emitted exactly one
  event per payment (distinct event ids read back from each topic; re-sent copies of the same
  event are counted, not failed); nothing reached a dead-letter topic. The business tables'
  ``correlation_id UNIQUE`` alone would hide a second execution: these counts cannot;
- spans exported by each service's SDK (``HOPTRACE_EXPORT_STATS_DIR`` accounting) vs stored;
- at least one payment was delayed past a deadline (else the alert checks prove nothing), each
  delayed payment got exactly one firing and one resolved alert (a real webhook receiver in this
  process, compared with the collector's ``alerts`` table), no payment done on time got an alert
  (within ``ALERT_MARGIN_S`` of a deadline either way an alert is allowed: spans reach the
  collector about a second after they end) and no notification reached the webhook twice;
- the diagnosis (``hoptrace.collector.api.diagnose``, plus a few ``hoptrace trace --format json``
  subprocesses) says ``completed`` for every payment.

Figures go to ``benchmarks/results/chaos.json`` (``--out``) and stdout; exit 1 if a bar is missed.
(One script, longer than most modules: the plan, the chaos, the checks and the verdict of one
run read together.)

    python benchmarks/chaos.py                 # 2,000 payments at 20/s, seed 7
    python benchmarks/chaos.py --short         # the suite's short version (~1-2 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common import free_port  # benchmarks/

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "chaos.json"
HOPTRACE = str(Path(sys.executable).parent / "hoptrace")
#: What the scheduler SIGKILLs (the load retries payment-service with the same Idempotency-Key).
KILLABLE = [
    "purchase-worker",
    "allocation-worker",
    "session-worker",
    "admin-service",
    "payment-service",
    "collector",
]
#: Held down past its step's deadline once (``Plan.stall``): delayed payments for sure.
STALLED = "session-worker"
SERVICES = [
    "collector",
    "admin-service",
    "payment-service",
    "purchase-worker",
    "allocation-worker",
    "session-worker",
]
TABLES = ["payments", "student_course_purchases", "trainer_allocations", "tutoring_sessions"]
#: A step gap this far past its deadline must have raised an alert (scan interval + write lag).
ALERT_MARGIN_S = 2.0
#: Wall-clock windows in which the collector was down (no stall can be seen in real time).
COLLECTOR_DOWN: list[tuple[float, float]] = []


@dataclass
class Plan:
    payments: int = 2000
    rate: float = 20.0
    seed: int = 7
    kills: int = 8
    kafka_restart: bool = True
    collector_stop_s: float = 30.0
    pg_restart: bool = True
    drain_timeout_s: float = 300.0
    cli_checks: int = 5
    short: bool = False
    #: every step's deadline, when set (a private copy of the spec): short runs see stalls too
    deadline_s: float | None = None
    #: hold STALLED down this long past its step's deadline once (0: no stall)
    stall_past_deadline_s: float = 10.0

    @classmethod
    def short_plan(cls, seed: int = 7) -> Plan:
        return cls(
            payments=120,
            rate=12.0,
            seed=seed,
            kills=1,
            kafka_restart=True,
            collector_stop_s=5.0,
            pg_restart=False,
            drain_timeout_s=90.0,
            cli_checks=2,
            short=True,
            deadline_s=8.0,
            stall_past_deadline_s=4.0,
        )


@dataclass
class Timeline:
    t0: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)

    def log(self, what: str, **info: Any) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 2), "event": what, **info}
        self.events.append(entry)
        print(f"[{entry['t']:7.2f}s] {what} {info if info else ''}", flush=True)


# ------------------------------------------------------------------------------ webhook receiver


class Webhook:
    """A real HTTP receiver for the collector's webhook: counts firing/resolved per correlation."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.bodies = 0
        lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    doc = json.loads(body)
                    alerts = [
                        (a["labels"]["correlation_id"], a["status"], a["startsAt"])
                        for a in doc.get("alerts", [])
                    ]
                except (ValueError, KeyError, TypeError):
                    self.send_response(400)
                    self.end_headers()
                    return
                with lock:
                    hook.bodies += 1
                    hook.events.extend(alerts)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def per_correlation(self, distinct: bool = False) -> dict[str, Counter[str]]:
        """Notifications per correlation and status; ``distinct``: a re-delivered notification
        of the same alert (same status and startsAt: at-least-once delivery) counted once."""
        out: dict[str, Counter[str]] = defaultdict(Counter)
        events = set(self.events) if distinct else list(self.events)
        for cid, status, _starts in events:
            out[cid][status] += 1
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------ the private stack


class Stack:
    """A private hoptrace stack (devstack parts) on free ports; everything torn down at close."""

    def __init__(
        self, home: Path, webhook_url: str, stats_dir: Path, deadline_s: float | None = None
    ) -> None:
        self.home = home
        ports = {k: free_port() for k in ("pg", "kafka", "ctl", "grpc", "http", "pay", "adm", "d")}
        env = {
            "HOPTRACE_HOME": str(home),
            "HOPTRACE_DEV_CACHE": str(ROOT / ".hoptrace" / "cache"),
            "HOPTRACE_DEV_PG_PORT": str(ports["pg"]),
            "HOPTRACE_DEV_KAFKA_PORT": str(ports["kafka"]),
            "HOPTRACE_DEV_CONTROLLER_PORT": str(ports["ctl"]),
            "HOPTRACE_DEV_TIMEOUT": "120",
            "HOPTRACE_OTLP_GRPC_PORT": str(ports["grpc"]),
            "HOPTRACE_OTLP_HTTP_PORT": str(ports["http"]),
            "HOPTRACE_PAYMENT_SERVICE_PORT": str(ports["pay"]),
            "HOPTRACE_ADMIN_SERVICE_PORT": str(ports["adm"]),
            "HOPTRACE_DASHBOARD_PORT": str(ports["d"]),
            "HOPTRACE_PAYMENT_SERVICE_URL": f"http://127.0.0.1:{ports['pay']}",
            "HOPTRACE_ADMIN_SERVICE_URL": f"http://127.0.0.1:{ports['adm']}",
            "HOPTRACE_DASHBOARD_URL": f"http://127.0.0.1:{ports['d']}",
            "HOPTRACE_ALERT_WEBHOOK_URL": webhook_url,
            "HOPTRACE_EXPORT_STATS_DIR": str(stats_dir),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{ports['grpc']}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            # the SDK holds a failed batch (HOPTRACE_EXPORT_HOLD_S) while new spans queue up:
            # the queue must hold a collector outage's worth of spans (~200/s per service)
            "OTEL_BSP_MAX_QUEUE_SIZE": "16384",
            "PYTHONUNBUFFERED": "1",
        }
        for k in ("HOPTRACE_DATABASE_URL", "HOPTRACE_KAFKA_BOOTSTRAP", "HOPTRACE_FAULT"):
            os.environ.pop(k, None)  # never inherit the shared stack's
        if deadline_s is not None:
            spec = home / "pipeline.toml"
            text = (ROOT / "pipelines" / "payments.toml").read_text()
            spec.write_text(re.sub(r'deadline = "[^"]+"', f'deadline = "{deadline_s:g}s"', text))
            env["HOPTRACE_PIPELINE"] = str(spec)
        os.environ.update(env)
        from hoptrace import devstack
        from hoptrace.settings import get_settings

        self.dev = devstack
        self.cfg = devstack.StackConfig.from_env()
        os.environ["HOPTRACE_DATABASE_URL"] = self.cfg.database_url
        os.environ["HOPTRACE_KAFKA_BOOTSTRAP"] = self.cfg.kafka_bootstrap
        get_settings.cache_clear()
        self.env = dict(os.environ)
        self.database_url = self.cfg.database_url
        self.payment_url = env["HOPTRACE_PAYMENT_SERVICE_URL"]

    def part(self, name: str) -> Any:
        return self.dev.part(self.cfg, name)

    def up(self) -> None:
        for p in self.dev.infra_parts(self.cfg):
            p.start()
        self.dev.run_init(self.cfg, echo=lambda _m: None)
        self.part("collector").start()
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=self._start_into, args=(n, errors)) for n in SERVICES[1:]
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def _start_into(self, name: str, errors: list[BaseException]) -> None:
        try:
            self.part(name).start()
        except BaseException as exc:  # noqa: BLE001 - re-raised by up()
            errors.append(exc)

    def start(self, name: str, within: float = 90.0) -> int:
        """(Re)start ``name``, retrying while its dependencies are still coming back."""
        end = time.monotonic() + within
        tries = 0
        while True:
            tries += 1
            try:
                self.part(name).start()
                return tries
            except self.dev.StackError:
                if time.monotonic() > end:
                    raise
                time.sleep(1.0)

    def stop_services(self) -> None:
        for name in reversed(SERVICES):
            if name != "collector":
                self.part(name).stop()

    def down(self) -> None:
        with contextlib.suppress(Exception):
            self.dev.down(self.cfg, echo=lambda _m: None)
        shutil.rmtree(self.home, ignore_errors=True)


# ------------------------------------------------------------------------------ load and chaos


async def traffic(
    stack: Stack, plan: Plan, rng: random.Random, tl: Timeline
) -> tuple[list[str], dict[str, int]]:
    """``plan.payments`` accepted payments at ``plan.rate``/s; a refused/failed request is
    retried with the same Idempotency-Key until accepted (a payment whose answer was lost is
    returned, not made twice). Returns the accepted ids (distinct) and request outcomes."""
    import httpx

    from hoptrace.workers.client import PaymentError, submit

    ids: list[str] = []
    counts: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=stack.payment_url, timeout=15.0, limits=limits) as cl:

        async def one(student: str, course: str, amount: str, key: str) -> None:
            for _attempt in range(60):
                try:
                    ids.append(await submit(cl, student, course, amount, idempotency_key=key))
                    counts["accepted"] += 1
                    return
                except PaymentError as exc:
                    counts["refused_or_unreachable"] += 1
                    if counts["refused_or_unreachable"] % 100 == 1:
                        tl.log(
                            "payment request failed; retrying",
                            failures_so_far=counts["refused_or_unreachable"],
                            error=str(exc)[:120],
                        )
                    await asyncio.sleep(0.5)
            counts["given_up"] += 1

        t0 = time.monotonic()
        tasks = []
        for i in range(plan.payments):
            delay = t0 + i / plan.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            student = f"student-{rng.randint(1, 100)}"
            course = f"course-{rng.randint(1, 20)}"
            amount = f"{rng.randint(10, 200)}.00"
            key = f"chaos-{plan.seed}-{i}"  # a retry of this payment is never a second one
            tasks.append(asyncio.create_task(one(student, course, amount, key)))
        await asyncio.gather(*tasks)
    tl.log("traffic done", accepted=len(ids), seconds=round(time.monotonic() - t0, 1))
    return ids, dict(counts)


def schedule(plan: Plan, rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded chaos plan: (infrastructure events, worker kills), times in seconds from start."""
    d = plan.payments / plan.rate
    infra: list[dict[str, Any]] = []
    if plan.kafka_restart:
        infra.append({"at": round(d * rng.uniform(0.15, 0.25), 2), "what": "kafka-restart"})
    if plan.collector_stop_s > 0:
        infra.append(
            {
                "at": round(d * rng.uniform(0.35, 0.45), 2),
                "what": "collector-stop",
                "for": plan.collector_stop_s,
            }
        )
    if plan.pg_restart:
        infra.append({"at": round(d * rng.uniform(0.75, 0.85), 2), "what": "postgres-restart"})
    if plan.stall_past_deadline_s > 0:
        deadline = spec_deadline_s(plan, STALLED)
        infra.append(
            {
                "at": round(d * rng.uniform(0.5, 0.6), 2),
                "what": "stall",
                "target": STALLED,
                "for": round(deadline + plan.stall_past_deadline_s, 2),
            }
        )
    # every killable service at least once (when there are enough kills), the rest at random
    targets = rng.sample(KILLABLE, min(plan.kills, len(KILLABLE)))
    targets += [rng.choice(KILLABLE) for _ in range(plan.kills - len(targets))]
    kills = [
        {
            "at": round(d * rng.uniform(0.05, 0.95), 2),
            "what": "sigkill",
            "target": target,
            "down_s": round(rng.uniform(0.5, 3.0), 2),
        }
        for target in targets
    ]
    if plan.short and kills:
        kills[0]["at"] = round(d * 0.1, 2)
    return infra, sorted(kills, key=lambda e: e["at"])


def spec_deadline_s(plan: Plan, service: str) -> float:
    """The deadline of ``service``'s step (the plan's, or the shipped spec's)."""
    if plan.deadline_s is not None:
        return plan.deadline_s
    from hoptrace.contract import load_spec

    spec = load_spec(ROOT / "pipelines" / "payments.toml")
    return spec.step_for_service(service).deadline.total_seconds()


async def _at(t0: float, at: float) -> None:
    delay = t0 + at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class Busy:
    """The services a chaos action holds: one action at a time per service (a kill waits for
    the collector's stop or the stall to end), and the watchdog leaves them alone."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> Any:
        async with self._locks[name]:
            self.names.add(name)
            try:
                yield
            finally:
                self.names.discard(name)


async def run_infra(
    stack: Stack, events: list[dict[str, Any]], t0: float, tl: Timeline, busy: Busy
) -> None:
    for ev in sorted(events, key=lambda e: e["at"]):
        await _at(t0, ev["at"])
        t = time.monotonic()
        if ev["what"] == "kafka-restart":
            tl.log("kafka: stopping")
            await asyncio.to_thread(stack.part("kafka").stop)
            await asyncio.to_thread(stack.part("kafka").start)
        elif ev["what"] == "collector-stop":
            async with busy.hold("collector"):
                tl.log("collector: stopping", seconds=ev["for"])
                down = time.time()
                await asyncio.to_thread(stack.part("collector").stop)
                await asyncio.sleep(ev["for"])
                await asyncio.to_thread(stack.start, "collector")
                COLLECTOR_DOWN.append((down, time.time()))
        elif ev["what"] == "stall":
            name = ev["target"]
            async with busy.hold(name):
                killed = await asyncio.to_thread(stack.part(name).kill)
                tl.log("stall: SIGKILL", target=name, was_running=killed, seconds=ev["for"])
                await asyncio.sleep(ev["for"])
                await asyncio.to_thread(stack.start, name)
        elif ev["what"] == "postgres-restart":
            tl.log("postgres: stopping")
            await asyncio.to_thread(stack.part("postgres").stop)
            await asyncio.to_thread(stack.part("postgres").start)
        ev["took_s"] = round(time.monotonic() - t, 2)
        tl.log(f"{ev['what']}: back", took_s=ev["took_s"])


async def run_kills(
    stack: Stack, kills: list[dict[str, Any]], t0: float, tl: Timeline, busy: Busy
) -> None:
    for ev in kills:
        await _at(t0, ev["at"])
        name = ev["target"]
        async with busy.hold(name):  # not while another action holds it (collector stop, stall)
            killed = await asyncio.to_thread(stack.part(name).kill)
            tl.log("SIGKILL", target=name, was_running=killed)
            await asyncio.sleep(ev["down_s"])
            ev["start_tries"] = await asyncio.to_thread(stack.start, name)
            tl.log("restarted", target=name, tries=ev["start_tries"])


async def watchdog(stack: Stack, tl: Timeline, busy: Busy, crashes: list[dict]) -> None:
    """A service that died when nobody killed it is a finding: record it and restart it."""
    while True:
        await asyncio.sleep(2.0)
        for name in SERVICES:
            if name in busy:
                continue
            p = stack.part(name)
            if p.pid() is None:
                tail = p.log_file.read_text(errors="replace").splitlines()[-8:]
                crashes.append({"service": name, "t": round(time.monotonic() - tl.t0, 1)})
                tl.log("UNEXPECTED EXIT; restarting", service=name, log=" | ".join(tail)[-600:])
                async with busy.hold(name):
                    await asyncio.to_thread(stack.start, name)


# ------------------------------------------------------------------------------ checks


async def _pg(stack: Stack) -> Any:
    import asyncpg

    return await asyncpg.connect(stack.database_url)


async def business_rows(stack: Stack, ids: list[str]) -> dict[str, Any]:
    """Per table: ids with 0 rows (lost) and with >1 row (duplicated); payments not requested."""
    conn = await _pg(stack)
    try:
        out: dict[str, Any] = {}
        all_payments = {
            r["correlation_id"] for r in await conn.fetch("SELECT correlation_id FROM payments")
        }
        universe = sorted(set(ids) | all_payments)
        for table in TABLES:
            rows = await conn.fetch(
                f"SELECT correlation_id, count(*) AS n FROM {table} "  # noqa: S608 - constants
                "WHERE correlation_id = ANY($1::text[]) GROUP BY correlation_id",
                universe,
            )
            n = {r["correlation_id"]: r["n"] for r in rows}
            out[table] = {
                "lost": sorted(c for c in universe if n.get(c, 0) == 0),
                "duplicated": sorted(c for c in universe if n.get(c, 0) > 1),
            }
        out["unrequested_payments"] = sorted(all_payments - set(ids))
        out["universe"] = universe
        return out
    finally:
        await conn.close()


async def handler_executions(stack: Stack, universe: list[str], spec: Any) -> dict[str, Any]:
    """Per consuming step: payments whose handler committed other than once (its processed
    marks: one per consumed event, so two marks are two events handled for one payment), and
    payments with more than one step span of outcome ``ok`` (a handler that ran to a commit
    twice; a redelivery after a commit says ``duplicate``)."""
    conn = await _pg(stack)
    try:
        marks = {
            (r["correlation_id"], r["source"]): r["n"]
            for r in await conn.fetch(
                "SELECT correlation_id, source, count(*) AS n FROM processed_events "
                "WHERE correlation_id = ANY($1::text[]) GROUP BY 1, 2",
                universe,
            )
        }
        oks = {
            (r["correlation_id"], r["step"]): r["n"]
            for r in await conn.fetch(
                "SELECT correlation_id, step, count(*) AS n FROM spans "
                "WHERE correlation_id = ANY($1::text[]) AND name = step AND outcome = 'ok' "
                "GROUP BY 1, 2",
                universe,
            )
        }
    finally:
        await conn.close()
    per_step: dict[str, dict[str, list[str]]] = {}
    for step in spec.steps:
        if not step.consumes:
            continue  # payment-service's step: its relay may re-send an event (same event id)
        per_step[step.id] = {
            "not_marked": sorted(c for c in universe if marks.get((c, step.id), 0) == 0),
            "marked_twice": sorted(c for c in universe if marks.get((c, step.id), 0) > 1),
            "ok_spans_twice": sorted(c for c in universe if oks.get((c, step.id), 0) > 1),
        }
    return per_step


async def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` up to its end offsets now (no group)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        out: list[Any] = []
        batch = await consumer.getmany(timeout_ms=2000)
        tps = sorted(consumer.assignment())
        ends = await consumer.end_offsets(tps) if tps else {}
        while True:
            for recs in batch.values():
                out.extend(recs)
            if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                return out
            batch = await consumer.getmany(timeout_ms=1000)
    finally:
        await consumer.stop()


async def emitted_events(stack: Stack, universe: list[str], spec: Any) -> dict[str, Any]:
    """Every record on the pipeline's topics and dead-letter topics, read back: per topic, the
    payments with no event, with more than one distinct event (a second emission), and how many
    records were re-sent copies of an event already there (at-least-once, not a failure)."""
    from hoptrace.contract.conventions import dlq_topic

    topics = [s.emits for s in spec.steps if s.emits]
    dlqs = [dlq_topic(s.consumes) for s in spec.steps if s.consumes]
    wanted = set(universe)
    out: dict[str, Any] = {}
    for topic in topics + dlqs:
        events: dict[str, set[str]] = defaultdict(set)
        records = 0
        for r in await _read_all(stack.cfg.kafka_bootstrap, topic):
            records += 1
            try:
                doc = json.loads(r.value)
                cid, eid = doc.get("correlation_id"), doc.get("event_id")
            except (ValueError, TypeError, AttributeError):
                cid, eid = None, None
            events[cid or "?"].add(eid or f"?{r.partition}@{r.offset}")
        if topic in dlqs:
            out[topic] = {"records": records}
            continue
        out[topic] = {
            "records": records,
            "resent_copies": records - sum(len(v) for v in events.values()),
            "missing": sorted(wanted - set(events)),
            "twice": sorted(c for c, ids in events.items() if c in wanted and len(ids) > 1),
        }
    return out


async def wait_drained(stack: Stack, ids: list[str], timeout: float, tl: Timeline) -> bool:
    """Every payment has its last row and the collector sees it completed (bounded)."""
    end = time.monotonic() + timeout
    last = None
    while True:
        try:
            conn = await _pg(stack)
            try:
                universe = list(
                    set(ids)
                    | {r[0] for r in await conn.fetch("SELECT correlation_id FROM payments")}
                )
                sessions = await conn.fetchval(
                    "SELECT count(DISTINCT correlation_id) FROM tutoring_sessions "
                    "WHERE correlation_id = ANY($1::text[])",
                    universe,
                )
                completed = await conn.fetchval(
                    "SELECT count(*) FROM correlations WHERE state = 'completed' "
                    "AND correlation_id = ANY($1::text[])",
                    universe,
                )
            finally:
                await conn.close()
        except Exception as exc:  # noqa: BLE001
            sessions, completed = -1, -1
            tl.log("drain check failed", error=str(exc)[:100])
        now = (sessions, completed, len(universe))
        if now != last:
            tl.log("drain", sessions=sessions, completed=completed, payments=len(universe))
            last = now
        if sessions == len(universe) and completed == len(universe):
            return True
        if time.monotonic() > end:
            return False
        await asyncio.sleep(1.0)


async def wait_alerts_settled(stack: Stack, timeout: float) -> bool:
    """Every alert delivered and resolved, and no deadline held by a collector that took over
    after a gap (those are judged, and maybe alerted, when its grace ends)."""
    end = time.monotonic() + timeout
    while True:
        conn = await _pg(stack)
        try:
            pending = await conn.fetchval(
                "SELECT count(*) FROM alerts WHERE status = 'firing' OR NOT delivered_firing "
                "OR NOT delivered_resolved"
            )
            held = await conn.fetchval(
                "SELECT count(*) FROM stall_scan WHERE hold_until IS NOT NULL"
            )
        finally:
            await conn.close()
        if pending == 0 and held == 0:
            return True
        if time.monotonic() > end:
            return False
        await asyncio.sleep(1.0)


async def wait_spans_stable(stack: Stack, timeout: float = 60.0, quiet_s: float = 4.0) -> int:
    """Spans stored stops growing for ``quiet_s`` (the collector wrote what it accepted)."""
    end = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        conn = await _pg(stack)
        try:
            n = await conn.fetchval("SELECT count(*) FROM spans")
        finally:
            await conn.close()
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        await asyncio.sleep(0.5)
    return last


def export_totals(stats_dir: Path) -> dict[str, dict[str, int]]:
    """Sum of every process's last export counts, per service."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for f in stats_dir.glob("*.json"):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        svc = doc.pop("service")
        out[svc]["processes"] += 1
        for k, v in doc.items():
            out[svc][k] += int(v)
    return {k: dict(v) for k, v in out.items()}


async def span_completeness(stack: Stack, stats_dir: Path) -> dict[str, Any]:
    conn = await _pg(stack)
    try:
        stored = {
            r["service"]: r["n"]
            for r in await conn.fetch("SELECT service, count(*) AS n FROM spans GROUP BY service")
        }
    finally:
        await conn.close()
    exported = export_totals(stats_dir)
    per: dict[str, Any] = {}
    for svc in sorted(set(stored) | set(exported)):
        e = exported.get(svc, {})
        n_exp, n_end = e.get("exported", 0), e.get("ended", 0)
        per[svc] = {
            "stored": stored.get(svc, 0),
            "exported": n_exp,
            "ended": n_end,
            "export_failed": e.get("export_failed", 0),
            "dropped_queue_full": e.get("dropped_queue_full", 0),
            "processes": e.get("processes", 0),
            "completeness_pct": round(100.0 * stored.get(svc, 0) / n_exp, 3) if n_exp else None,
            "of_ended_pct": round(100.0 * stored.get(svc, 0) / n_end, 3) if n_end else None,
        }
    return per


async def alert_check(
    stack: Stack, universe: list[str], hook: Webhook, spec: Any
) -> dict[str, Any]:
    """Delayed payments (from stored step spans) vs alerts in the table and at the webhook."""
    conn = await _pg(stack)
    try:
        rows = await conn.fetch(
            """SELECT correlation_id, step, min(end_time) AS done FROM spans
               WHERE correlation_id = ANY($1::text[]) AND step IS NOT NULL AND name = step
                 AND coalesce(outcome, 'ok') IN ('ok', 'duplicate')
               GROUP BY correlation_id, step""",
            universe,
        )
        table = await conn.fetch(
            "SELECT correlation_id, step, status, delivered_firing, delivered_resolved, "
            "fired_at, resolved_at FROM alerts"
        )
    finally:
        await conn.close()
    done: dict[str, dict[str, Any]] = defaultdict(dict)
    for r in rows:
        done[r["correlation_id"]][r["step"]] = r["done"]
    must, boundary, unseen, just_before, worst = set(), set(), set(), set(), {}
    for cid, steps in done.items():
        # a later step done means this one was done by then (its own span may be a redelivery's)
        later = None
        for step in reversed(spec.steps):
            t = steps.get(step.id)
            if later is not None and (t is None or later < t):
                steps[step.id] = t = later
            later = t if t is not None else later
        for prev, step in zip(spec.steps, spec.steps[1:], strict=False):
            a, b = steps.get(prev.id), steps.get(step.id)
            if a is None or b is None:
                continue
            over = (b - a).total_seconds() - step.deadline.total_seconds()
            worst[cid] = max(worst.get(cid, -1e9), over)
            due = (a + step.deadline).timestamp()
            if over > ALERT_MARGIN_S and any(d0 <= due and b.timestamp() <= d1 + ALERT_MARGIN_S
                                             for d0, d1 in COLLECTOR_DOWN):  # fmt: skip
                # overdue and moved on while the collector was down: the scanner that takes
                # over judges it from span times (one alert, fired and resolved)
                unseen.add(cid)
                must.add(cid)
            elif over > ALERT_MARGIN_S:
                must.add(cid)
            elif over > 0:
                boundary.add(cid)
            elif over > -ALERT_MARGIN_S:
                # done just before the deadline: its span reaches the collector ~0.5-1.5 s after
                # it ends (batched export, commit-after-export), maybe after the deadline; an
                # alert then (fired and resolved at once) is allowed, and counted apart
                boundary.add(cid)
                just_before.add(cid)
    per_table: dict[str, Counter[str]] = defaultdict(Counter)
    steps_alerted: dict[str, list[str]] = defaultdict(list)
    alert_times: dict[str, list[str]] = defaultdict(list)
    undelivered = 0
    for r in table:
        per_table[r["correlation_id"]][r["status"]] += 1
        steps_alerted[r["correlation_id"]].append(r["step"])
        alert_times[r["correlation_id"]].append(
            f"{r['step']} fired {r['fired_at']} resolved {r['resolved_at']}"
        )
        if not (r["delivered_firing"] and (r["status"] != "resolved" or r["delivered_resolved"])):
            undelivered += 1
    raw = hook.per_correlation()
    hooked = hook.per_correlation(distinct=True)
    alerted = set(per_table) | set(hooked)

    def exact(c: str) -> bool:
        """One alert per stall (a payment may stall at two different steps): each row resolved,
        at a distinct step, each announced once firing and once resolved."""
        n = len(steps_alerted.get(c, []))
        return (
            n >= 1
            and len(set(steps_alerted[c])) == n
            and per_table[c] == Counter({"resolved": n})
            and hooked.get(c, Counter()) == Counter({"firing": n, "resolved": n})
        )

    not_exactly_one = sorted(c for c in alerted if not exact(c))
    firing = sum(c["firing"] for c in hooked.values())
    resolved = sum(c["resolved"] for c in hooked.values())
    return {
        "stalled_at_two_steps": sum(1 for v in steps_alerted.values() if len(v) > 1),
        "redelivered_notifications": sum(sum(v.values()) for v in raw.values())
        - sum(sum(v.values()) for v in hooked.values()),
        "examples_redelivered": [
            {"correlation_id": c, "status": st, "starts_at": at, "times": n}
            for (c, st, at), n in Counter(hook.events).items()
            if n > 1
        ][:5],
        "alerted_done_just_before_deadline": len(just_before & (set(per_table) | set(hooked))),
        "expected": len(must),
        "boundary": len(boundary),
        "alerted_correlations": len(alerted),
        "webhook_firing": firing,
        "webhook_resolved": resolved,
        "table_rows": len(table),
        "table_undelivered": undelivered,
        "expected_without_alert": sorted(must - alerted),
        "delayed_while_collector_down": len(unseen),
        "delayed_while_collector_down_alerted": len(unseen & alerted),
        "not_exactly_one_firing_one_resolved": not_exactly_one,
        "alerted_not_delayed": sorted(alerted - must - boundary - unseen),
        "examples_expected_without_alert": {
            c: {"over_s": round(worst[c], 2), **{k: str(v) for k, v in done[c].items()}}
            for c in sorted(must - alerted)[:5]
        },
        "examples_alerted_not_delayed": {
            c: {
                "over_s": round(worst.get(c, 0.0), 2),
                "alerts": alert_times.get(c, []),
                **{k: str(v) for k, v in done.get(c, {}).items()},
            }
            for c in sorted(alerted - must - boundary - unseen)[:5]
        },
        "examples_not_exactly_one": {
            c: {
                "webhook": dict(raw.get(c, {})),
                "table": dict(per_table.get(c, {})),
                "steps": steps_alerted.get(c, []),
            }
            for c in not_exactly_one[:5]
        },
    }


async def diagnose_all(universe: list[str], concurrency: int = 12) -> dict[str, Any]:
    from hoptrace.collector import api

    sem = asyncio.Semaphore(concurrency)
    causes: Counter[str] = Counter()
    bad: dict[str, str] = {}

    async def one(cid: str) -> None:
        async with sem:
            d = None
            try:
                d = await api.diagnose(cid)
                verdict = d.cause if d.found else "not_found"
            except Exception as exc:  # noqa: BLE001
                verdict = f"error:{type(exc).__name__}"
            causes[verdict] += 1
            if verdict != "completed":
                bad[cid] = f"{verdict} at {getattr(d, 'stopped_at', None)}"

    t = time.monotonic()
    try:
        await asyncio.gather(*(one(c) for c in universe))
    finally:
        await api.close()
    return {
        "causes": dict(causes),
        "not_completed": dict(list(bad.items())[:20]),
        "seconds": round(time.monotonic() - t, 1),
    }


def cli_checks(stack: Stack, ids: list[str]) -> list[dict[str, Any]]:
    out = []
    for cid in ids:
        res = subprocess.run(
            [HOPTRACE, "trace", cid, "--format", "json"],
            capture_output=True,
            text=True,
            env=stack.env,
            timeout=60,
        )
        try:
            doc = json.loads(res.stdout)
            out.append({"id": cid, "exit": res.returncode, "state": doc.get("state"),
                        "cause": doc.get("cause")})  # fmt: skip
        except ValueError:
            out.append({"id": cid, "exit": res.returncode, "error": res.stderr[-300:]})
    return out


# ------------------------------------------------------------------------------ the run


async def chaos(plan: Plan, stack: Stack, hook: Webhook, stats_dir: Path) -> dict[str, Any]:
    from hoptrace.contract import load_spec
    from hoptrace.settings import get_settings

    rng = random.Random(plan.seed)
    tl = Timeline()
    infra, kills = schedule(plan, rng)
    tl.log("plan", infra=infra, kills=kills)
    await asyncio.to_thread(stack.up)
    tl.log("stack up", home=str(stack.home))

    busy = Busy()
    crashes: list[dict] = []
    t0 = time.monotonic()
    dog = asyncio.create_task(watchdog(stack, tl, busy, crashes))
    load = asyncio.create_task(traffic(stack, plan, rng, tl))
    chaos_tasks = [
        asyncio.create_task(run_infra(stack, infra, t0, tl, busy)),
        asyncio.create_task(run_kills(stack, kills, t0, tl, busy)),
    ]
    # a failing chaos action (e.g. a part that did not come back) ends the run with its error
    await asyncio.gather(*chaos_tasks)
    ids, requests = await load
    traffic_s = round(time.monotonic() - t0, 1)

    drained = await wait_drained(stack, ids, plan.drain_timeout_s, tl)
    tl.log("drained" if drained else "DRAIN TIMEOUT")
    rows = await business_rows(stack, ids)
    universe = rows.pop("universe")
    spec = load_spec(get_settings().pipeline)
    executions = await handler_executions(stack, universe, spec)
    events = await emitted_events(stack, universe, spec)
    settled = await wait_alerts_settled(stack, 60.0 if drained else 5.0)
    tl.log("alerts settled" if settled else "alerts NOT settled")
    diag = await diagnose_all(universe)
    tl.log("diagnosed", **diag["causes"])
    cli = await asyncio.to_thread(
        cli_checks, stack, rng.sample(ids, min(plan.cli_checks, len(ids)))
    )
    dog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dog
    # graceful stop: every SDK flushes and writes its final export counts
    await asyncio.to_thread(stack.stop_services)
    await wait_spans_stable(stack)
    spans = await span_completeness(stack, stats_dir)
    alerts = await alert_check(stack, universe, hook, spec)

    dup_rows = {c for t in TABLES for c in rows[t]["duplicated"]}
    dup_runs = {
        c for per in executions.values() for k in ("marked_twice", "ok_spans_twice") for c in per[k]
    }
    emits = {t: v for t, v in events.items() if "twice" in v}
    dup_events = {c for v in emits.values() for c in v["twice"]}
    lost = sorted(
        {c for t in TABLES for c in rows[t]["lost"]}
        | {c for per in executions.values() for c in per["not_marked"]}
        | {c for v in emits.values() for c in v["missing"]}
    )
    dup = sorted(dup_rows | dup_runs | dup_events)
    dead_letters = sum(v["records"] for t, v in events.items() if t not in emits)
    worker_pct = [v["completeness_pct"] for k, v in spans.items() if k != "collector"]
    min_pct = min((p for p in worker_pct if p is not None), default=None)
    result = {
        "plan": asdict(plan),
        "payments": len(universe),
        "accepted": len(ids),
        "requests": requests,
        "lost": len(lost),
        "duplicated": len(dup),
        "lost_ids": lost[:20],
        "duplicated_ids": dup[:20],
        "duplicated_rows": len(dup_rows),
        "duplicated_handler_executions": len(dup_runs),
        "duplicated_events": len(dup_events),
        "per_table": {t: {k: len(v) for k, v in rows[t].items()} for t in TABLES},
        "handler_executions": {
            step: {k: len(v) for k, v in per.items()} for step, per in executions.items()
        },
        "emitted_events": {
            t: {k: (len(v) if isinstance(v, list) else v) for k, v in per.items()}
            for t, per in events.items()
        },
        "dead_letters": dead_letters,
        "unrequested_payments": len(rows["unrequested_payments"]),
        "drained": drained,
        "alerts_settled": settled,
        "spans": spans,
        "min_span_completeness_pct": min_pct,
        "alerts": alerts,
        "diagnosis": diag,
        "completed": diag["causes"].get("completed", 0),
        "cli": cli,
        "unexpected_exits": crashes,
        "traffic_s": traffic_s,
        "seconds": round(time.monotonic() - tl.t0, 1),
        "timeline": tl.events,
    }
    result["ok"] = (
        result["lost"] == 0
        and result["duplicated"] == 0
        and min_pct is not None
        and min_pct >= 99.9
        and result["completed"] == len(universe)
        and dead_letters == 0
        and alerts["expected"] >= 1  # else the alert checks below prove nothing
        and not alerts["expected_without_alert"]
        and not alerts["not_exactly_one_firing_one_resolved"]
        and not alerts["alerted_not_delayed"]  # an alert for an on-time payment
        and alerts["redelivered_notifications"] == 0  # a notification sent twice
        and all(c.get("cause") == "completed" for c in cli)
        and not crashes
    )
    return result


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"payments {r['payments']} (accepted {r['accepted']}, requests {r['requests']}, "
        f"unrequested {r['unrequested_payments']}), lost {r['lost']}, duplicated "
        f"{r['duplicated']} (rows {r['duplicated_rows']}, handler executions "
        f"{r['duplicated_handler_executions']}, emitted events {r['duplicated_events']}), "
        f"dead letters {r['dead_letters']}, drained {r['drained']}",
        "handler executions per step: "
        + "; ".join(f"{s} {v}" for s, v in r["handler_executions"].items()),
        "emitted events per topic: "
        + "; ".join(f"{t} {v}" for t, v in r["emitted_events"].items() if "twice" in v),
        "span completeness (stored/exported, stored/ended) per service:",
    ]
    for svc, s in r["spans"].items():
        lines.append(
            f"  {svc:<18} stored {s['stored']:>7} exported {s['exported']:>7} ended {s['ended']:>7}"
            f" failed {s['export_failed']:>6} queue-full {s['dropped_queue_full']:>5}"
            f"  {s['completeness_pct']}%  ({s['of_ended_pct']}% of ended)"
        )
    a = r["alerts"]
    lines += [
        f"alerts: expected {a['expected']} (+{a['boundary']} within {ALERT_MARGIN_S}s of the "
        f"deadline), alerted {a['alerted_correlations']}, fired {a['webhook_firing']}, resolved "
        f"{a['webhook_resolved']}, expected-without-alert {len(a['expected_without_alert'])}, "
        f"not-exactly-one {len(a['not_exactly_one_firing_one_resolved'])} (stalled at two steps "
        f"{a['stalled_at_two_steps']}, notifications re-delivered {a['redelivered_notifications']}), "
        f"alerted-not-delayed {len(a['alerted_not_delayed'])} (+"
        f"{a['alerted_done_just_before_deadline']} done < {ALERT_MARGIN_S}s before the deadline), "
        f"delayed while the collector was "
        f"down {a['delayed_while_collector_down']} (alerted "
        f"{a['delayed_while_collector_down_alerted']})",
        f"diagnosis: {r['diagnosis']['causes']} in {r['diagnosis']['seconds']}s; CLI: "
        + ", ".join(f"{c.get('cause')}" for c in r["cli"]),
        f"unexpected exits: {len(r['unexpected_exits'])}; took {r['seconds']}s; ok={r['ok']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="the suite's short version")
    ap.add_argument("--payments", type=int)
    ap.add_argument("--rate", type=float)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--kills", type=int)
    ap.add_argument("--collector-stop", type=float, help="seconds the collector is down")
    ap.add_argument("--no-postgres-restart", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the stack folder (logs) at the end")
    args = ap.parse_args(argv)
    plan = Plan.short_plan(args.seed) if args.short else Plan(seed=args.seed)
    for attr, value in (
        ("payments", args.payments),
        ("rate", args.rate),
        ("kills", args.kills),
        ("collector_stop_s", args.collector_stop),
    ):
        if value is not None:
            setattr(plan, attr, value)
    if args.no_postgres_restart:
        plan.pg_restart = False

    home = ROOT / ".hoptrace" / "chaos" / str(os.getpid())
    home.mkdir(parents=True, exist_ok=True)
    stats_dir = home / "export-stats"
    stats_dir.mkdir()
    hook = Webhook()
    stack = Stack(home, hook.url, stats_dir, plan.deadline_s)
    result: dict[str, Any] | None = None
    try:
        result = asyncio.run(chaos(plan, stack, hook, stats_dir))
    finally:
        if args.keep:
            keep = ROOT / ".hoptrace" / "chaos" / f"kept-{os.getpid()}"
            with contextlib.suppress(Exception):
                stack.stop_services()
                stack.dev.down(stack.cfg, echo=lambda _m: None)
                shutil.copytree(home / "logs", keep / "logs")
                shutil.copytree(stats_dir, keep / "export-stats")
        stack.down()
        hook.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(summary(result))
    print(f"figures: {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
