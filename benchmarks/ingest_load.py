"""Load generation for the ingest benchmark: pre-encoded OTLP/HTTP protobuf requests (fresh
trace, span and correlation ids patched in, so the generator stays cheap) posted from separate
worker processes by a lean keep-alive HTTP/1.1 client that retries 503/429 like an SDK exporter.

- ``realistic``: one request per service per round of 96 payments of :data:`REAL_TRACE`.
- ``worst_case``: every span a step span, 512-span requests (128 correlations x 4 step spans).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
import uuid
from typing import Any

from ingest_trace import REAL_TRACE, RESOURCE, SERVICES, STEPS  # benchmarks/

from hoptrace.contract import conventions as c_

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
        ids (the correlation ids are kept in ``last_cids``)."""
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
        self.last_cids = [cid.decode() for _, _, cid in ids]
        return list(zip(out, self.counts, strict=True))


def _set(attr, value: object) -> None:  # noqa: ANN001
    if isinstance(value, bool):
        attr.value.bool_value = value
    elif isinstance(value, int):
        attr.value.int_value = value
    else:
        attr.value.string_value = str(value)


def realistic_template(npay: int = 96, start_ns: int | None = None) -> Template:
    """One request per service of :data:`REAL_TRACE` for ``npay`` payments, starting now (or at
    ``start_ns``)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    now = time.time_ns() if start_ns is None else start_ns
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
                (c_.ATTR_CORRELATION_ID, cids[c]),
                (c_.ATTR_PIPELINE, "payments"),
                (c_.ATTR_STEP, step),
                (c_.ATTR_OUTCOME, "ok"),
                (c_.MSG_DESTINATION, "purchase-created"),
                (c_.MSG_GROUP, svc),
            ):
                a = sp.attributes.add()
                a.key, a.value.string_value = k, v
            for k, n in (
                (c_.MSG_PARTITION, 1),
                (c_.MSG_OFFSET, 12345),
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


async def post_accepted(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
) -> int:
    """POST ``body`` until it is accepted, retrying 503/429 after 50 ms as an SDK exporter
    would; returns how many times it was refused (any other answer raises)."""
    refused = 0
    while (status := await _post(reader, writer, path, body)) != 200:
        if status not in (429, 503):
            raise RuntimeError(f"unexpected HTTP {status}")
        refused += 1
        await asyncio.sleep(0.05)
    return refused


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
                refused += await post_accepted(reader, writer, path, body)
            writer.close()

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return sent, refused

    sent, refused = asyncio.run(run())
    out.put((sent, refused, time.process_time() - cpu0))


async def start_load(
    port: int, mix: str, spans: int, workers: int, concurrency: int, rate: float = 0,
    path: str = "/v1/traces",
) -> tuple[list, mp.Queue]:  # type: ignore[type-arg]  # fmt: skip
    """Load processes, started (``go``) once each has built its requests; each puts (sent,
    refused, cpu seconds) on the returned queue when done."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    go = ctx.Event()
    per = spans // workers
    procs = [
        ctx.Process(
            target=worker,
            args=("127.0.0.1", port, path, mix, per, concurrency, rate / workers, ready, go, out),
        )
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    for _ in procs:
        await loop.run_in_executor(None, ready.get, True, 120)
    go.set()
    return procs, out


def collect(procs: list, out: mp.Queue) -> list[tuple[int, int, float]]:  # type: ignore[type-arg]
    """The load processes' (sent, refused, cpu seconds), once they are done."""
    loads = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    return loads
