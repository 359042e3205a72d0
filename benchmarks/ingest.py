"""Collector ingest benchmark.

Two span mixes, each against a fresh ``hoptrace collector`` process and database:

- ``realistic`` (the bar is judged on this one): the reference pipeline's real span mix, copied
  from a real payment trace (:data:`REAL_TRACE`: 16 spans per payment, 4 of them step spans, the
  others ASGI server, asyncpg, aiokafka send and httpx client spans with their real attributes,
  4-17 attributes each, 5 resource attributes). Requests are per service, as the SDKs export
  them: a round of 96 payments is 5 requests (payment-service 480 spans, purchase-worker,
  allocation-worker and admin-service 288, session-worker 192), so one correlation's step spans
  arrive in 4 different requests (1 insert + 3 updates of its state).
- ``worst_case``: every span a step span (512-span requests = 128 correlations x 4 step spans,
  8 attributes each, all 4 steps of a correlation in the same request).

Per mix:
1. Saturation: load from separate worker processes (a lean keep-alive HTTP/1.1 client posting
   OTLP/HTTP protobuf, retrying 503/429 like an SDK exporter; fresh ids patched into pre-encoded
   requests so the generator stays cheap) as fast as the collector takes it. Reported: sustained
   spans/s stored, loss (sent - stored by ``count(*)``), 503 answers, CPU per span of the
   collector process, of its PostgreSQL backends and of all PostgreSQL processes (from /proc),
   and of the load generator.
2. Fixed rate at the bar (``--rate``, 50k spans/s): whether the collector keeps up, and the
   receive-to-queryable latency (a probe posts single spans every 50 ms and polls
   ``spans_for_correlation`` until they are there: p50/p99). Also measured idle.
3. Jaeger v2 (in-memory storage, ``.hoptrace/tools/bin/jaeger``) under the same realistic load,
   at saturation, for a ratio (its spans counted by its own exporter metric).

Then the stall scan: 1M in-flight correlations (``in_progress``, deadlines spread over the next
hour, plus 100 overdue); the scan statement timed over repeated runs.

Run: ``.venv/bin/python benchmarks/ingest.py [--mix realistic,worst_case] [--spans 400000]``. JSON
goes to ``benchmarks/results/ingest.json``.
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
from typing import Any

import asyncpg
import httpx
from common import create_database, drop_database, free_port  # benchmarks/

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["payment.confirmed", "purchase.created", "trainer.allocated", "session.created"]
SERVICES = ["payment-service", "purchase-worker", "allocation-worker", "session-worker"]
PB = {"content-type": "application/x-protobuf"}


# ---------------------------------------------------------------- load generator (worker side)

REAL_TRACE: list[tuple[str, str, int, str, int, int, int | None, dict[str, object]]] = [
    (
        "payment-service",
        "POST /payments",
        2,
        "opentelemetry.instrumentation.asgi",
        0,
        3091,
        None,
        {
            "http.url": "http://127.0.0.1:8081/payments",
            "http.host": "127.0.0.1:8081",
            "http.flavor": "1.1",
            "http.method": "POST",
            "http.scheme": "http",
            "http.target": "/payments",
            "net.peer.ip": "127.0.0.1",
            "net.host.port": 8081,
            "net.peer.port": 34758,
            "http.user_agent": "python-httpx/0.28.1",
            "http.server_name": "127.0.0.1:8081",
            "http.status_code": 201,
            "hoptrace.correlation_id": "{cid}",
        },
    ),
    (
        "payment-service",
        "WITH",
        3,
        "opentelemetry.instrumentation.asyncpg",
        600,
        1645,
        0,
        {
            "db.name": "hoptrace",
            "db.user": "hoptrace",
            "db.system": "postgresql",
            "db.statement": "\n"
            "WITH known AS (\n"
            "    SELECT EXISTS (SELECT 1 FROM students WHERE id = $2) AS student,\n"
            "           EXISTS (SELECT 1 FROM courses WHERE id = $3) AS course\n"
            "), payment AS (\n"
            "    INSERT INTO payments (payment_id, correlation_id, student, course, "
            "amount, status)\n"
            "    SELECT $1, $1, $2, $3, $4, 'succeeded' FROM known WHERE known.student AND "
            "known.course\n"
            "    RETURNING payment_id\n"
            "), outbox AS (\n"
            "    INSERT INTO payment_outbox (correlation_id, topic, event, trace_carrier)\n"
            "    SELECT payment_id, $6, $7, $8::jsonb FROM payment WHERE $5::boolean\n"
            ")\n"
            "SELECT student, course FROM known\n",
            "net.peer.name": "127.0.0.1",
            "net.peer.port": 55432,
            "net.transport": "ip_tcp",
            "hoptrace.correlation_id": "{cid}",
        },
    ),
    (
        "payment-service",
        "SELECT",
        3,
        "opentelemetry.instrumentation.asyncpg",
        2449,
        190,
        0,
        {
            "db.name": "hoptrace",
            "db.user": "hoptrace",
            "db.system": "postgresql",
            "db.statement": "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;",
            "net.peer.name": "127.0.0.1",
            "net.peer.port": 55432,
            "net.transport": "ip_tcp",
            "hoptrace.correlation_id": "{cid}",
        },
    ),
    (
        "payment-service",
        "payment.confirmed",
        4,
        "hoptrace.instrumentation",
        3937,
        3340,
        0,
        {
            "hoptrace.step": "payment.confirmed",
            "messaging.system": "kafka",
            "hoptrace.pipeline": "payments",
            "hoptrace.emit.topic": "purchase-confirmed",
            "hoptrace.emit.offset": 1,
            "hoptrace.step.outcome": "ok",
            "hoptrace.emit.event_id": "1e1e0075-1e41-4036-b8fd-e4b4cc48b15e",
            "messaging.kafka.offset": 1,
            "hoptrace.correlation_id": "{cid}",
            "hoptrace.emit.partition": 1,
            "messaging.operation.type": "send",
            "messaging.destination.name": "purchase-confirmed",
            "messaging.destination.partition.id": "1",
        },
    ),
    (
        "payment-service",
        "purchase-confirmed send",
        4,
        "opentelemetry.instrumentation.aiokafka",
        4108,
        76,
        3,
        {
            "server.address": '"127.0.0.1:59092"',
            "messaging.system": "kafka",
            "messaging.client.id": "aiokafka-producer-1",
            "hoptrace.correlation_id": "{cid}",
            "messaging.operation.name": "send",
            "messaging.operation.type": "publish",
            "messaging.destination.name": "purchase-confirmed",
            "messaging.kafka.message.key": "{cid}",
            "messaging.destination.partition.id": "1",
        },
    ),
    (
        "purchase-worker",
        "purchase.created",
        5,
        "hoptrace.instrumentation",
        5622,
        19965,
        4,
        {
            "hoptrace.step": "purchase.created",
            "messaging.system": "kafka",
            "hoptrace.attempts": 1,
            "hoptrace.event.id": "1e1e0075-1e41-4036-b8fd-e4b4cc48b15e",
            "hoptrace.pipeline": "payments",
            "hoptrace.emit.topic": "purchase-created",
            "hoptrace.event.type": "PURCHASE_CONFIRMED",
            "hoptrace.emit.offset": 1,
            "hoptrace.step.outcome": "ok",
            "hoptrace.emit.event_id": "b69c6a3c-e8d3-5906-bd56-8d8d87addefe",
            "messaging.kafka.offset": 1,
            "hoptrace.correlation_id": "{cid}",
            "hoptrace.emit.partition": 1,
            "messaging.operation.type": "process",
            "messaging.destination.name": "purchase-confirmed",
            "messaging.consumer.group.name": "purchase-worker",
            "messaging.destination.partition.id": "1",
        },
    ),
    (
        "purchase-worker",
        "INSERT",
        3,
        "opentelemetry.instrumentation.asyncpg",
        10426,
        1001,
        5,
        {
            "db.name": "hoptrace",
            "db.user": "hoptrace",
            "db.system": "postgresql",
            "db.statement": "INSERT INTO student_course_purchases (correlation_id, payment_id, student, "
            "course, metadata)\n"
            "           VALUES ($1, $2, $3, $4, $5::jsonb)\n"
            "           ON CONFLICT (correlation_id) DO UPDATE SET correlation_id = "
            "EXCLUDED.correlation_id\n"
            "           RETURNING id",
            "net.peer.name": "127.0.0.1",
            "net.peer.port": 55432,
            "net.transport": "ip_tcp",
            "hoptrace.correlation_id": "{cid}",
        },
    ),
    (
        "purchase-worker",
        "purchase-created send",
        4,
        "opentelemetry.instrumentation.aiokafka",
        17923,
        111,
        5,
        {
            "server.address": '"127.0.0.1:59092"',
            "messaging.system": "kafka",
            "messaging.client.id": "aiokafka-producer-1",
            "hoptrace.correlation_id": "{cid}",
            "messaging.operation.name": "send",
            "messaging.operation.type": "publish",
            "messaging.destination.name": "purchase-created",
            "messaging.kafka.message.key": "{cid}",
            "messaging.destination.partition.id": "1",
        },
    ),
    (
        "allocation-worker",
        "trainer.allocated",
        5,
        "hoptrace.instrumentation",
        19689,
        129729,
        7,
        {
            "hoptrace.step": "trainer.allocated",
            "messaging.system": "kafka",
            "hoptrace.attempts": 1,
            "hoptrace.event.id": "b69c6a3c-e8d3-5906-bd56-8d8d87addefe",
            "hoptrace.pipeline": "payments",
            "hoptrace.emit.topic": "trainer-allocated",
            "hoptrace.event.type": "PURCHASE_CREATED",
            "hoptrace.emit.offset": 1,
            "hoptrace.step.outcome": "ok",
            "hoptrace.emit.event_id": "091932e6-ce7f-59bf-a832-45a6ae9b9c7d",
            "messaging.kafka.offset": 1,
            "hoptrace.correlation_id": "{cid}",
            "hoptrace.emit.partition": 1,
            "messaging.operation.type": "process",
            "messaging.destination.name": "purchase-created",
            "messaging.consumer.group.name": "allocation-worker",
            "messaging.destination.partition.id": "1",
        },
    ),
    (
        "allocation-worker",
        "POST",
        3,
        "opentelemetry.instrumentation.httpx",
        41916,
        99561,
        8,
        {
            "http.url": "http://127.0.0.1:8082/allocations",
            "http.method": "POST",
            "http.status_code": 200,
            "hoptrace.correlation_id": "{cid}",
        },
    ),
    (
        "admin-service",
        "POST /allocations",
        2,
        "opentelemetry.instrumentation.asgi",
        109956,
        12047,
        9,
        {
            "http.url": "http://127.0.0.1:8082/allocations",
            "http.host": "127.0.0.1:8082",
            "http.flavor": "1.1",
            "http.method": "POST",
            "http.scheme": "http",
            "http.target": "/allocations",
            "net.peer.ip": "127.0.0.1",
            "net.host.port": 8082,
            "net.peer.port": 42864,
            "http.user_agent": "python-httpx/0.28.1",
            "http.server_name": "127.0.0.1:8082",
            "http.status_code": 200,
            "hoptrace.correlation_id": "{cid}",
        },
    ),
    (
        "admin-service",
        "INSERT",
        3,
        "opentelemetry.instrumentation.asyncpg",
        111173,
        9744,
        10,
        {
            "db.name": "hoptrace",
            "db.user": "hoptrace",
            "db.system": "postgresql",
            "db.statement": "INSERT INTO trainer_allocations (correlation_id, student, course, trainer)\n"
            "                   VALUES ($1, $2, $3, $4)\n"
            "                   ON CONFLICT (correlation_id) DO NOTHING RETURNING trainer",
            "net.peer.name": "127.0.0.1",
            "net.peer.port": 55432,
            "net.transport": "ip_tcp",
            "hoptrace.correlation_id": "{cid}",
        },
    ),
    (
        "admin-service",
        "SELECT",
        3,
        "opentelemetry.instrumentation.asyncpg",
        121240,
        351,
        10,
        {
            "db.name": "hoptrace",
            "db.user": "hoptrace",
            "db.system": "postgresql",
            "db.statement": "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;",
            "net.peer.name": "127.0.0.1",
            "net.peer.port": 55432,
            "net.transport": "ip_tcp",
            "hoptrace.correlation_id": "{cid}",
        },
    ),
    (
        "allocation-worker",
        "trainer-allocated send",
        4,
        "opentelemetry.instrumentation.aiokafka",
        148559,
        126,
        8,
        {
            "server.address": '"127.0.0.1:59092"',
            "messaging.system": "kafka",
            "messaging.client.id": "aiokafka-producer-1",
            "hoptrace.correlation_id": "{cid}",
            "messaging.operation.name": "send",
            "messaging.operation.type": "publish",
            "messaging.destination.name": "trainer-allocated",
            "messaging.kafka.message.key": "{cid}",
            "messaging.destination.partition.id": "1",
        },
    ),
    (
        "session-worker",
        "session.created",
        5,
        "hoptrace.instrumentation",
        150193,
        6664,
        13,
        {
            "hoptrace.step": "session.created",
            "messaging.system": "kafka",
            "hoptrace.attempts": 1,
            "hoptrace.event.id": "091932e6-ce7f-59bf-a832-45a6ae9b9c7d",
            "hoptrace.pipeline": "payments",
            "hoptrace.event.type": "TRAINER_ALLOCATED",
            "hoptrace.step.outcome": "ok",
            "messaging.kafka.offset": 1,
            "hoptrace.correlation_id": "{cid}",
            "messaging.operation.type": "process",
            "messaging.destination.name": "trainer-allocated",
            "messaging.consumer.group.name": "session-worker",
            "messaging.destination.partition.id": "1",
        },
    ),
    (
        "session-worker",
        "INSERT",
        3,
        "opentelemetry.instrumentation.asyncpg",
        151454,
        399,
        14,
        {
            "db.name": "hoptrace",
            "db.user": "hoptrace",
            "db.system": "postgresql",
            "db.statement": "INSERT INTO tutoring_sessions (correlation_id, student, course, trainer, "
            "starts_at)\n"
            "           VALUES ($1, $2, $3, $4, $5)\n"
            "           ON CONFLICT (correlation_id) DO NOTHING",
            "net.peer.name": "127.0.0.1",
            "net.peer.port": 55432,
            "net.transport": "ip_tcp",
            "hoptrace.correlation_id": "{cid}",
        },
    ),
]

RESOURCE = {
    "telemetry.sdk.name": "opentelemetry",
    "telemetry.sdk.version": "1.45.1",
    "telemetry.sdk.language": "python",
}
#: (offsets of the trace id, [(span index, offsets of its id)], offsets of the correlation id)
Patch = tuple[list[int], list[tuple[int, list[int]]], list[int]]


class Template:
    """Pre-encoded requests of one round of payments and where to patch fresh ids into them."""

    def __init__(self, bodies: list[bytes], counts: list[int], tids, sids, cids) -> None:  # noqa: ANN001
        self.bodies = bodies
        self.counts = counts
        self.npay = len(cids)
        self.nspans = len(sids[0])
        self.patches: list[list[Patch]] = []
        for body in bodies:

            def all_at(needle: bytes, body: bytes = body) -> list[int]:
                out, i = [], body.find(needle)
                while i >= 0:
                    out.append(i)
                    i = body.find(needle, i + 1)
                return out

            per_pay = []
            for p in range(self.npay):
                s_off = [(i, o) for i, sid in enumerate(sids[p]) if (o := all_at(sid))]
                per_pay.append((all_at(tids[p]), s_off, all_at(cids[p].encode())))
            self.patches.append(per_pay)

    def fresh(self) -> list[tuple[bytes, int]]:
        """The round's requests (and their span counts) with new trace, span and correlation
        ids."""
        rnd = os.urandom(self.npay * (16 + 16 + 8 * self.nspans))
        out = []
        ids = []
        p = 0
        for _ in range(self.npay):
            tid, cid = rnd[p : p + 16], rnd[p + 16 : p + 32].hex().encode()
            p += 32
            sids = [rnd[p + 8 * i : p + 8 * i + 8] for i in range(self.nspans)]
            p += 8 * self.nspans
            ids.append((tid, sids, cid))
        for body, per_pay in zip(self.bodies, self.patches, strict=True):
            ba = bytearray(body)
            for (tid, sids, cid), (t_off, s_off, c_off) in zip(ids, per_pay, strict=True):
                for o in t_off:
                    ba[o : o + 16] = tid
                for i, offs in s_off:
                    for o in offs:
                        ba[o : o + 8] = sids[i]
                for o in c_off:
                    ba[o : o + 32] = cid
            out.append(bytes(ba))
        return list(zip(out, self.counts, strict=True))


def _set(attr, value: object) -> None:  # noqa: ANN001
    if isinstance(value, bool):
        attr.value.bool_value = value
    elif isinstance(value, int):
        attr.value.int_value = value
    else:
        attr.value.string_value = str(value)


def realistic_template(npay: int = 96) -> Template:
    """One request per service of :data:`REAL_TRACE` for ``npay`` payments."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    now = time.time_ns()
    cids = [uuid.uuid4().hex for _ in range(npay)]
    tids = [os.urandom(16) for _ in range(npay)]
    sids = [[os.urandom(8) for _ in REAL_TRACE] for _ in range(npay)]
    services = list(dict.fromkeys(t[0] for t in REAL_TRACE))
    bodies, counts = [], []
    for svc in services:
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        for k, v in {
            "service.name": svc,
            **RESOURCE,
            "service.instance.id": str(uuid.uuid4()),
        }.items():
            _set(rs.resource.attributes.add(key=k), v)
        scopes: dict[str, object] = {}
        for p in range(npay):
            for i, (s, name, kind, scope, off, dur, parent, attrs) in enumerate(REAL_TRACE):
                if s != svc:
                    continue
                if scope not in scopes:
                    scopes[scope] = rs.scope_spans.add()
                    scopes[scope].scope.name = scope  # type: ignore[attr-defined]
                sp = scopes[scope].spans.add()  # type: ignore[attr-defined]
                sp.trace_id, sp.span_id, sp.name, sp.kind = tids[p], sids[p][i], name, kind
                if parent is not None:
                    sp.parent_span_id = sids[p][parent]
                sp.start_time_unix_nano = now + off * 1000
                sp.end_time_unix_nano = now + (off + dur) * 1000
                for k, v in attrs.items():
                    v = v.replace("{cid}", cids[p]) if isinstance(v, str) else v
                    _set(sp.attributes.add(key=k), v)
        bodies.append(req.SerializeToString())
        counts.append(sum(len(ss.spans) for ss in rs.scope_spans))
    return Template(bodies, counts, tids, sids, cids)


def worst_case_template(ncorr: int = 128) -> Template:
    """Every span a step span: 512-span requests (see :func:`build_template`)."""
    body, offsets = build_template(ncorr)
    t = Template.__new__(Template)
    t.bodies, t.counts, t.npay, t.nspans = [body], [ncorr * 4], ncorr, 4
    t.patches = [
        [(t_off, list(enumerate([o] for o in s_off)), c_off) for t_off, s_off, c_off in offsets]
    ]
    return t


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
    """``body`` (from :func:`build_template`) with fresh ids."""
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


TEMPLATES = {"realistic": realistic_template, "worst_case": worst_case_template}


async def _post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
) -> int:
    """One HTTP/1.1 keep-alive POST; the status code (the response body is read and dropped)."""
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-protobuf\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body))
    )
    writer.write(body)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


def worker(
    host: str, port: int, path: str, mix: str, spans: int, concurrency: int, rate: float,
    ready: mp.Queue, go: Any, out: mp.Queue,  # type: ignore[type-arg]
) -> None:  # fmt: skip
    """Post at least ``spans`` spans of ``mix`` (at ``rate`` spans/s when > 0), once ``go`` is
    set; the requests are built beforehand (only sending is timed). Puts (sent, refused, cpu
    seconds while sending) on ``out``."""
    template = TEMPLATES[mix]()
    bodies: list[tuple[bytes, int]] = []
    n = 0
    while n < spans:
        for body, k in template.fresh():
            bodies.append((body, k))
            n += k
    bodies.reverse()
    ready.put(True)
    go.wait()
    cpu0 = time.process_time()

    async def run() -> tuple[int, int]:
        sent = refused = 0
        t0 = time.perf_counter()

        async def lane() -> None:
            nonlocal sent, refused
            reader, writer = await asyncio.open_connection(host, port)
            while bodies:
                body, k = bodies.pop()
                sent += k
                if rate:
                    ahead = sent / rate - (time.perf_counter() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                while (status := await _post(reader, writer, path, body)) != 200:
                    if status not in (429, 503):
                        raise RuntimeError(f"unexpected HTTP {status}")
                    refused += 1
                    await asyncio.sleep(0.05)
            writer.close()

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return sent, refused

    sent, refused = asyncio.run(run())
    out.put((sent, refused, time.process_time() - cpu0))


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


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def start_collector(
    args: argparse.Namespace, db_url: str, mix: str
) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
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
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "hoptrace"), "collector"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(ROOT / "benchmarks" / "results" / f"ingest-collector-{mix}.log", "w"),  # noqa: SIM115
    )
    return proc, http_port


async def start_load(
    port: int, path: str, mix: str, spans: int, args: argparse.Namespace, rate: float = 0
) -> tuple[list, mp.Queue]:  # type: ignore[type-arg]
    """Load processes, started once each has built its requests."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    go = ctx.Event()
    per = spans // args.workers
    procs = [
        ctx.Process(
            target=worker,
            args=(
                "127.0.0.1",
                port,
                path,
                mix,
                per,
                args.concurrency,
                rate / args.workers,
                ready,
                go,
                out,
            ),
        )  # fmt: skip
        for _ in range(args.workers)
    ]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    for _ in procs:
        await loop.run_in_executor(None, ready.get, True, 120)
    go.set()
    return procs, out


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
            if len(samples) > 2 and samples[-3][1] == n:
                break
        await asyncio.sleep(0.1)
    return samples


async def mix_phase(args: argparse.Namespace, admin: str, mix: str) -> dict:
    """Saturation and fixed-rate runs of one span mix against a fresh collector + database."""
    db_url = await create_database(admin)
    proc, port = start_collector(args, db_url, mix)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"mix": mix}
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
            stop = asyncio.Event()
            idle_probe = asyncio.create_task(probe_latency(base, db_url, stop))
            await asyncio.sleep(3)  # receive-to-queryable with no other load
            stop.set()
            idle = await idle_probe

            # 1. saturation
            floor = await stored_counter(http, base)
            pg0, cpu0 = postgres_cpu(), proc_cpu(proc.pid)
            procs, out = await start_load(port, "/v1/traces", mix, args.spans, args)
            samples = await wait_stored(http, base, procs, floor, args.timeout)
            cpu = proc_cpu(proc.pid) - cpu0
            pg1 = postgres_cpu()
            loads = [out.get(timeout=30) for _ in procs]
            for p in procs:
                p.join()
            conn = await asyncpg.connect(db_url)
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
            await conn.close()
            pg_backend = sum(pg1[p] - pg0.get(p, 0.0) for p in backends if p in pg1)
            pg_all = sum(v - pg0.get(p, 0.0) for p, v in pg1.items())
            sent = sum(r[0] for r in loads)
            total = samples[-1][1]
            first = next(t for t, n in samples if n > 0)  # the load processes are up
            elapsed = next(t for t, n in samples if n >= total) - first
            lo = next(s for s in samples if s[1] >= 0.2 * total)
            hi = next(s for s in samples if s[1] >= 0.8 * total)
            steady = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else float("nan")
            per = 1e6 / max(stored, 1)
            result["saturation"] = {
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
                "pg_all_processes_cpu_us_per_span": round(pg_all * per, 1),
                "load_generator_cpu_us_per_span": round(sum(r[2] for r in loads) * per, 1),
                "collector_cpu_share_of_one_core": round(cpu / elapsed, 2),
                "pg_cpu_share_of_one_core": round(pg_all / elapsed, 2),
            }

            # 2. fixed rate at the bar, with latency probes
            if args.rate:
                floor = await stored_counter(http, base)
                stop = asyncio.Event()
                probe = asyncio.create_task(probe_latency(base, db_url, stop))
                n = int(args.rate * args.rate_seconds)
                procs, out = await start_load(port, "/v1/traces", mix, n, args, rate=args.rate)
                samples = await wait_stored(http, base, procs, floor, args.timeout, stop)
                lat = await probe
                loads = [out.get(timeout=30) for _ in procs]
                for p in procs:
                    p.join()
                got = samples[-1][1]
                first = next(t for t, v in samples if v > 0)  # the load processes are up
                done_at = next(t for t, v in samples if v >= got) - first
                refused = sum(r[1] for r in loads)
                result["fixed_rate"] = {
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
            result["idle_receive_to_queryable_p50_ms"] = round(pct(idle, 50) * 1000, 1)
            result["idle_receive_to_queryable_p99_ms"] = round(pct(idle, 99) * 1000, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        await drop_database(admin, db_url)
    return result


JAEGER_CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: normal
      readers:
        - pull:
            exporter:
              prometheus:
                host: 127.0.0.1
                port: ${env:JAEGER_METRICS_PORT}
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:${env:JAEGER_QUERY_HTTP_PORT}
    grpc:
      endpoint: 127.0.0.1:${env:JAEGER_QUERY_GRPC_PORT}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 2000000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:${env:JAEGER_OTLP_HTTP_PORT}
processors:
  batch:
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


async def jaeger_phase(args: argparse.Namespace, mix: str) -> dict:
    """The same load against Jaeger v2 (in-memory storage), at saturation."""
    binary = ROOT / ".hoptrace" / "tools" / "bin" / "jaeger"
    if not binary.exists():
        return {"skipped": f"{binary} not built"}
    ports = {k: free_port() for k in ("METRICS", "QUERY_HTTP", "QUERY_GRPC", "OTLP_HTTP")}
    cfg = ROOT / "benchmarks" / "results" / "ingest-jaeger.yaml"
    cfg.write_text(JAEGER_CONFIG)
    env = {**os.environ, **{f"JAEGER_{k}_PORT": str(v) for k, v in ports.items()}}
    proc = subprocess.Popen(  # noqa: ASYNC220
        [str(binary), "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(ROOT / "benchmarks" / "results" / "ingest-jaeger.log", "w"),  # noqa: ASYNC230, SIM115
    )
    metrics = f"http://127.0.0.1:{ports['METRICS']}/metrics"

    async def exported(http: httpx.AsyncClient) -> float:
        total = 0.0
        for line in (await http.get(metrics)).text.splitlines():
            if line.startswith("otelcol_exporter_sent_spans"):
                total += float(line.split()[-1])
        return total

    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(300):
                try:
                    await exported(http)
                    with socket.create_connection(("127.0.0.1", ports["OTLP_HTTP"]), 1):
                        break
                except (httpx.HTTPError, OSError):
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError("jaeger did not start")
            cpu0 = proc_cpu(proc.pid)
            procs, out = await start_load(ports["OTLP_HTTP"], "/v1/traces", mix, args.spans, args)
            t0 = time.perf_counter()
            samples: list[tuple[float, float]] = []
            while time.perf_counter() - t0 < args.timeout:
                samples.append((time.perf_counter() - t0, await exported(http)))
                if all(not p.is_alive() for p in procs) and len(samples) > 2:
                    if samples[-3][1] == samples[-1][1]:
                        break
                await asyncio.sleep(0.2)
            cpu = proc_cpu(proc.pid) - cpu0
            loads = [out.get(timeout=30) for _ in procs]
            for p in procs:
                p.join()
        sent = sum(r[0] for r in loads)
        total = samples[-1][1]
        first = next(t for t, n in samples if n > 0)
        elapsed = next(t for t, n in samples if n >= total) - first
        return {
            "mix": mix,
            "spans_sent": sent,
            "spans_exported_to_storage": round(total),
            "lost": sent - round(total),
            "seconds": round(elapsed, 2),
            "spans_per_s_overall": round(total / elapsed),
            "refused": sum(r[1] for r in loads),
            "jaeger_cpu_us_per_span": round(cpu / max(total, 1) * 1e6, 1),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def scan_phase(db_url: str, n: int, runs: int = 50) -> dict:
    from hoptrace.collector import schema
    from hoptrace.collector.stalls import scan_once

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
                rows = await scan_once(conn, 1000)
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
                rows = await scan_once(conn, 1000)
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


def save(result: dict) -> None:
    """Write the results so far (a later phase failing keeps the earlier figures)."""
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "ingest.json").write_text(json.dumps(result, indent=2))


async def main_async(args: argparse.Namespace) -> dict:
    import hoptrace_native  # noqa: F401 - the native decoder must be built for this figure

    from hoptrace import devstack

    admin = devstack.StackConfig.from_env().database_url
    out: dict = {
        "cpu_count": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "decoder": "native (hoptrace_native.decode_traces -> binary COPY)",
        "load_generator": "separate processes, requests built before the clock starts, lean "
        "keep-alive HTTP/1.1 client, 503 -> retry after 50 ms",
        "bar_judged_on": "realistic",
        "why": "the bar is about real traffic; the realistic mix is the reference pipeline's real "
        "span mix per payment (16 spans, 4 step spans). worst_case (every span a step span, the "
        "fold on every span) is the lower bound, reported too.",
    }
    for mix in args.mix.split(","):
        out[mix] = await mix_phase(args, admin, mix)
        save(out)
    if args.jaeger:
        out["jaeger"] = await jaeger_phase(args, "realistic")
        ours = out.get("realistic", {}).get("saturation", {}).get("spans_per_s_overall")
        theirs = out["jaeger"].get("spans_per_s_overall")
        if ours and theirs:
            out["hoptrace_to_jaeger_throughput_ratio"] = round(ours / theirs, 2)
        save(out)
    if args.correlations:
        db_url = await create_database(admin)
        try:
            out["stall_scan"] = await scan_phase(db_url, args.correlations)
        finally:
            await drop_database(admin, db_url)
    out["loadavg_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mix", default="realistic,worst_case")
    ap.add_argument("--spans", type=int, default=400_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--queue", type=int, default=50_000)
    ap.add_argument("--rate", type=float, default=50_000, help="fixed-rate phase, spans/s (0: off)")
    ap.add_argument("--rate-seconds", type=float, default=8)
    ap.add_argument("--jaeger", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--correlations", type=int, default=1_000_000)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    result = asyncio.run(main_async(args))
    save(result)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
