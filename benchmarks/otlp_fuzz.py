"""Bounded network fuzzing of a running ``hoptrace collector`` (a subprocess on free ports):
random and mutated OTLP bodies to HTTP ``/v1/traces`` and gRPC ``Export``, then the verdict:
crashes (process gone), hangs (no answer within the timeout), 5xx answers to bad input, RSS of
the collector process before/after a stream of oversized and compressed bodies, and whether a
good span sent afterwards is still stored (the writer is not wedged by anything fuzzed).

Gzip bodies include multi-member ones (several members in a row, as ``cat a.gz b.gz`` makes):
whole requests split over members (every member's spans must be stored), members that together
inflate past the cap (413) and a member followed by junk (400).

Shared by ``benchmarks/fuzz_otlp.py`` (many cases) and the tests (``tests/reliability``: a few
hundred cases; ``tests/security`` and others start a collector with :class:`CollectorProc`),
which import it as ``benchmarks.otlp_fuzz``; it imports nothing of the tests. (Longer than most
modules: the case generators and the collector process they run against are one harness, used
whole by both.)"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOPTRACE = str(Path(sys.executable).parent / "hoptrace")
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: Request size cap the fuzzed collector runs with (small, so oversized bodies are cheap).
MAX_BODY = 4 * 1024 * 1024
TIMEOUT_S = 15.0


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (from /proc; no psutil)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------ the collector under test


@dataclass
class CollectorProc:
    """``hoptrace collector`` as users start it, on free ports, against ``db_url``."""

    db_url: str
    spec_path: Path
    workdir: Path
    token: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    http_port: int = 0
    grpc_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "collector.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 30.0) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        ready = self.workdir / "collector.ready"
        ready.unlink(missing_ok=True)
        env = {
            **os.environ,
            "HOPTRACE_DATABASE_URL": self.db_url,
            "HOPTRACE_PIPELINE": str(self.spec_path),
            "HOPTRACE_OTLP_HTTP_PORT": str(self.http_port),
            "HOPTRACE_OTLP_GRPC_PORT": str(self.grpc_port),
            "HOPTRACE_MAX_BODY_BYTES": str(MAX_BODY),
            "HOPTRACE_READY_FILE": str(ready),
            "PYTHONUNBUFFERED": "1",
        }
        for k in ("HOPTRACE_INGEST_TOKEN", "HOPTRACE_SPAN_TOPIC", "HOPTRACE_ALERT_WEBHOOK_URL"):
            env.pop(k, None)
        env.update(self.extra_env)  # after the pops: a test may set a webhook or a topic
        if self.token:
            env["HOPTRACE_INGEST_TOKEN"] = self.token
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [HOPTRACE, "collector"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"collector exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"collector not ready in {timeout}s: {self.tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        assert self.proc is not None
        return rss_kb(self.proc.pid)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ------------------------------------------------------------------ bodies


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def valid_request(rng: random.Random, cid: str | None = None, spans: int = 2) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(kv("service.name", "fuzz-service"))
    ss = rs.scope_spans.add()
    ss.scope.name = "fuzz"
    now = time.time_ns()
    for i in range(spans):
        ss.spans.append(
            Span(
                trace_id=rng.randbytes(16),
                span_id=rng.randbytes(8),
                name=f"fuzz.{i}",
                kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=now,
                end_time_unix_nano=now + 1000,
                attributes=[kv("hoptrace.correlation_id", cid or f"fuzz-{rng.randrange(10**9)}")],
            )
        )
    return req.SerializeToString()


def odd_request(rng: random.Random) -> bytes:
    """Well-formed protobuf with values that are legal OTLP but hostile to a store: NUL
    characters, huge/odd correlation ids, extreme timestamps, deep attribute values."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(kv("service.name", rng.choice(["svc\x00nul", "", "s" * 5000])))
    ss = rs.scope_spans.add()
    ss.scope.name = rng.choice(["", "scope\x00", "é" * 100])
    deep = AnyValue(string_value="leaf\x00")
    for _ in range(rng.randrange(1, 25)):
        deep = AnyValue(array_value={"values": [deep]})
    cid = rng.choice(
        ["x'; DROP TABLE spans; --", "c" * 5000, "nul\x00id", "ok-" + str(rng.random()), ""]
    )
    ss.spans.append(
        Span(
            trace_id=rng.randbytes(16),
            span_id=rng.randbytes(8),
            name=rng.choice(["a\x00b", "", "n" * 20000, "\u202e\ufeff"]),
            start_time_unix_nano=rng.choice([0, 1, 2**64 - 1, time.time_ns()]),
            end_time_unix_nano=rng.choice([0, 2**63, time.time_ns()]),
            attributes=[
                kv("hoptrace.correlation_id", cid),
                kv("hoptrace.step", rng.choice(["payment.confirmed", "x\x00", "s" * 3000])),
                kv("k\x00", "v\x00"),
                KeyValue(key="deep", value=deep),
                kv("big", rng.randrange(-(2**63), 2**63)),
            ],
            status={"code": rng.randrange(0, 3), "message": rng.choice(["", "m\x00"])},
        )
    )
    return req.SerializeToString()


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        op = rng.randrange(5)
        if op == 0 and b:  # flip bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 3 and b:  # duplicate a slice
            i = rng.randrange(len(b))
            b[i:i] = b[i : i + rng.randrange(1, 64)]
        elif b:  # set a byte to an extreme varint-ish value
            b[rng.randrange(len(b))] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
    return bytes(b)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    if depth > 6 or rng.random() < 0.3:
        return rng.choice(
            [None, True, 0, -1, 2**70, 1.5e308, "", "x", "\u0000", "\ud7ff", "zz", "0" * 33]
        )
    if rng.random() < 0.5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["resourceSpans", "scopeSpans", "spans", "traceId", "spanId", "attributes", "links"]
    keys += ["key", "value", "stringValue", "kvlistValue", "arrayValue", "values", "name"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def json_request(rng: random.Random) -> bytes:
    span = {
        "traceId": rng.randbytes(16).hex(),
        "spanId": rng.randbytes(8).hex(),
        "name": "json.fuzz",
        "startTimeUnixNano": str(time.time_ns()),
        "endTimeUnixNano": str(time.time_ns()),
        "attributes": [{"key": "hoptrace.correlation_id", "value": {"stringValue": "j-1"}}],
    }
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
    return json.dumps(doc).encode()


def mutate_json(rng: random.Random, data: bytes) -> bytes:
    doc = json.loads(data)
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    key = rng.choice(list(span) + ["kind", "status", "events", "links"])
    span[key] = random_json(rng)
    return json.dumps(doc).encode()


def deep_json(rng: random.Random) -> bytes:
    n = rng.choice([500, 5000, 100_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    return b'{"resourceSpans":' + opener * n + closer * rng.choice([0, n]) + b"}"


#: Compressed once: 64 MiB of zeros (~64 KiB gzipped), far over the decompressed cap.
_BOMB: bytes | None = None


def gzip_bomb() -> bytes:
    global _BOMB
    if _BOMB is None:
        _BOMB = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    return _BOMB


def multi_member(rng: random.Random, last_cid: str) -> bytes:
    """One request as 2-4 gzip members (protobuf messages concatenate: the members' bytes in a
    row are one request); the last member's spans carry ``last_cid`` (a receiver that stops at
    the first member loses them). An empty member is thrown in now and then."""
    members = [gzip.compress(valid_request(rng)) for _ in range(rng.randrange(1, 4))]
    if rng.random() < 0.3:
        members.insert(rng.randrange(len(members) + 1), gzip.compress(b""))
    members.append(gzip.compress(valid_request(rng, cid=last_cid)))
    return b"".join(members)


def multi_member_bomb(rng: random.Random) -> bytes:
    """Members each under the decompressed cap, together over it: 413, like one big member."""
    piece = gzip.compress(b"\x0a" * (MAX_BODY // 2 + 1024))
    return piece * rng.randrange(2, 5)


@dataclass(frozen=True)
class HttpCase:
    kind: str
    body: bytes
    headers: dict[str, str]
    valid: bool = False  # a well-formed request: 200 expected
    cid: str | None = None  # a correlation id whose spans must be stored afterwards


def http_case(rng: random.Random) -> HttpCase:
    pb = {"content-type": "application/x-protobuf"}
    js = {"content-type": "application/json"}
    r = rng.randrange(19)
    if r == 0:
        return HttpCase("random-protobuf", rng.randbytes(rng.randrange(0, 4096)), pb)
    if r in (1, 2):
        return HttpCase("mutated-protobuf", mutate(rng, valid_request(rng)), pb)
    if r == 3:
        return HttpCase("valid-protobuf", valid_request(rng), pb, valid=True)
    if r == 4:
        return HttpCase("odd-protobuf", odd_request(rng), pb, valid=True)
    if r == 5:
        return HttpCase("random-json", json.dumps(random_json(rng)).encode(), js)
    if r == 6:
        return HttpCase("mutated-json", mutate_json(rng, json_request(rng)), js)
    if r == 7:
        return HttpCase("byte-mutated-json", mutate(rng, json_request(rng)), js)
    if r == 8:
        return HttpCase("deep-json", deep_json(rng), js)
    if r == 9:
        body = gzip.compress(valid_request(rng))
        return HttpCase("gzip-protobuf", body, {**pb, "content-encoding": "gzip"}, valid=True)
    if r == 10:
        body = gzip.compress(valid_request(rng))
        cut = body[: rng.randrange(len(body))]
        return HttpCase("truncated-gzip", cut, {**pb, "content-encoding": "gzip"})
    if r == 11:
        return HttpCase("gzip-bomb", gzip_bomb(), {**pb, "content-encoding": "gzip"})
    if r == 12:
        ctype = rng.choice(["text/plain", "", "multipart/form-data", "application/x-protobuf2"])
        return HttpCase("wrong-content-type", valid_request(rng), {"content-type": ctype})
    if r == 13:
        enc = rng.choice(["br", "deflate", "gzip, gzip", "zstd"])
        return HttpCase("wrong-encoding", valid_request(rng), {**pb, "content-encoding": enc})
    if r == 14:
        return HttpCase("random-gzip", rng.randbytes(200), {**pb, "content-encoding": "gzip"})
    if r == 16:
        cid = f"multi-member-{rng.randrange(10**12)}"
        body = multi_member(rng, cid)
        gz = {**pb, "content-encoding": "gzip"}
        return HttpCase("gzip-multi-member", body, gz, valid=True, cid=cid)
    if r == 17:
        body = multi_member_bomb(rng)
        return HttpCase("gzip-multi-member-bomb", body, {**pb, "content-encoding": "gzip"})
    if r == 18:  # a good member, then bytes that are no gzip member: refused whole (400)
        body = gzip.compress(valid_request(rng)) + rng.randbytes(rng.randrange(1, 64))
        return HttpCase("gzip-member-then-junk", body, {**pb, "content-encoding": "gzip"})
    return HttpCase("json-as-protobuf", json_request(rng), pb)


def grpc_case(rng: random.Random) -> tuple[str, bytes, bool]:
    r = rng.randrange(5)
    if r == 0:
        return "random", rng.randbytes(rng.randrange(0, 4096)), False
    if r in (1, 2):
        return "mutated", mutate(rng, valid_request(rng)), False
    if r == 3:
        return "odd", odd_request(rng), True
    return "valid", valid_request(rng), True


# ------------------------------------------------------------------ the run


@dataclass
class Report:
    cases: int = 0
    http_cases: int = 0
    grpc_cases: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    hangs: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    valid_refused: list[str] = field(default_factory=list)
    #: correlation ids of accepted multi-member gzip bodies (their last member's spans)
    multi_member_sent: list[str] = field(default_factory=list)
    multi_member_missing: list[str] = field(default_factory=list)
    crashed: bool = False
    healthy_after: bool = False
    canary_stored: bool = False
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    rss_peak_kb: int = 0
    memory_cases: int = 0
    seconds: float = 0.0

    def note(self, kind: str, status: str) -> None:
        self.cases += 1
        self.by_status[status] += 1
        self.by_kind.setdefault(kind, Counter())[status] += 1

    def as_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "http_cases": self.http_cases,
            "grpc_cases": self.grpc_cases,
            "memory_cases": self.memory_cases,
            "by_status": dict(self.by_status),
            "by_kind": {k: dict(v) for k, v in sorted(self.by_kind.items())},
            "crashes": int(self.crashed),
            "hangs": len(self.hangs),
            "server_errors_500": len(self.server_errors),
            "valid_refused": len(self.valid_refused),
            "multi_member_accepted": len(self.multi_member_sent),
            "multi_member_spans_missing": len(self.multi_member_missing),
            "examples": {
                "hangs": self.hangs[:5],
                "server_errors": self.server_errors[:5],
                "valid_refused": self.valid_refused[:5],
            },
            "healthy_after": self.healthy_after,
            "canary_stored": self.canary_stored,
            "rss_before_mb": round(self.rss_before_kb / 1024, 1),
            "rss_peak_mb": round(self.rss_peak_kb / 1024, 1),
            "rss_after_mb": round(self.rss_after_kb / 1024, 1),
            "rss_growth_mb": round((self.rss_after_kb - self.rss_before_kb) / 1024, 1),
            "seconds": round(self.seconds, 1),
        }


async def _http_one(client: httpx.AsyncClient, url: str, case: HttpCase, rep: Report) -> None:
    try:
        resp = await asyncio.wait_for(
            client.post(url, content=case.body, headers=case.headers), TIMEOUT_S
        )
    except (TimeoutError, httpx.TimeoutException):
        rep.hangs.append(f"http {case.kind}")
        rep.note(case.kind, "timeout")
        return
    except httpx.HTTPError as exc:  # connection dropped: the server may have died
        rep.server_errors.append(f"http {case.kind}: {type(exc).__name__}: {exc}")
        rep.note(case.kind, "connection-error")
        return
    rep.note(case.kind, str(resp.status_code))
    if resp.status_code >= 500:
        rep.server_errors.append(f"http {case.kind}: {resp.status_code} {resp.text[:200]}")
    elif case.valid and resp.status_code != 200:
        rep.valid_refused.append(f"http {case.kind}: {resp.status_code} {resp.text[:200]}")
    elif case.cid is not None and resp.status_code == 200:
        rep.multi_member_sent.append(case.cid)


async def stored_cids(col: CollectorProc, cids: list[str], timeout: float = 20.0) -> set[str]:
    """Which of ``cids`` the store holds spans of, once all are there or ``timeout`` passed."""
    conn = await asyncpg.connect(col.db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await conn.fetch(
                "SELECT DISTINCT correlation_id FROM spans WHERE correlation_id = ANY($1)", cids
            )
            found = {r[0] for r in rows}
            if found >= set(cids) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


_BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}


async def _grpc_one(call: Any, kind: str, body: bytes, valid: bool, rep: Report) -> None:
    try:
        await call(body, timeout=TIMEOUT_S)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    name = f"grpc-{code.name}"
    rep.note(f"grpc-{kind}", name)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        rep.hangs.append(f"grpc {kind}")
    elif code in _BAD_GRPC:
        rep.server_errors.append(f"grpc {kind}: {code.name}")
    elif valid and code != grpc.StatusCode.OK:
        rep.valid_refused.append(f"grpc {kind}: {code.name}")


async def raw_http(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send raw bytes (for lying headers httpx would not send); the status line back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
        return line
    finally:
        writer.close()


async def _lying_headers(col: CollectorProc, rep: Report) -> None:
    for kind, length in [("huge-content-length", "99999999999999"), ("bad-content-length", "x")]:
        head = (
            f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        try:
            line = await raw_http(col.http_port, head, b"abc")
        except TimeoutError:
            rep.hangs.append(f"http {kind}")
            rep.note(kind, "timeout")
            continue
        status = line.split(b" ")[1].decode() if line.count(b" ") >= 1 else "no-answer"
        rep.note(kind, status)
        if not status.isdigit() or int(status) >= 500:
            rep.server_errors.append(f"http {kind}: {line!r}")


async def _memory_stream(col: CollectorProc, rep: Report, n: int) -> None:
    """Oversized and compressed bodies, two at a time; RSS sampled before, during, after."""
    url = f"{col.http}/v1/traces"
    over = os.urandom(1024) * (MAX_BODY // 1024 + 64)  # over the cap: 413 while streaming
    near = gzip.compress(b"\x0a" * (MAX_BODY - 1024))  # inflates to just under the cap
    pb = {"content-type": "application/x-protobuf"}
    bodies = [
        ("oversized", over, pb),
        ("gzip-bomb", gzip_bomb(), {**pb, "content-encoding": "gzip"}),
        ("gzip-near-cap", near, {**pb, "content-encoding": "gzip"}),
    ]
    rep.rss_before_kb = rep.rss_peak_kb = col.rss_kb()
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        for i in range(0, n, 2):
            batch = [bodies[(i + j) % len(bodies)] for j in range(2)]
            await asyncio.gather(
                *(_http_one(client, url, HttpCase(k, b, h), rep) for k, b, h in batch)
            )
            rep.memory_cases += len(batch)
            rep.rss_peak_kb = max(rep.rss_peak_kb, col.rss_kb())
    rep.rss_after_kb = col.rss_kb()


async def canary_stored(col: CollectorProc, cid: str, timeout: float = 20.0) -> bool:
    """Send one good span; True once the store holds it (the writers are not wedged)."""
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        resp = await client.post(
            f"{col.http}/v1/traces",
            content=valid_request(random.Random(), cid=cid, spans=1),
            headers={"content-type": "application/x-protobuf"},
        )
        if resp.status_code != 200:
            return False
    conn = await asyncpg.connect(col.db_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = await conn.fetchval("SELECT count(*) FROM spans WHERE correlation_id = $1", cid)
            if n:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await conn.close()


async def run(
    col: CollectorProc, http_cases: int, grpc_cases: int, memory_cases: int, seed: int = 1234
) -> Report:
    """Fuzz ``col`` (already started) and return the verdict."""
    rng = random.Random(seed)
    rep = Report()
    t0 = time.monotonic()
    url = f"{col.http}/v1/traces"
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:

        async def one_http() -> None:
            async with sem:
                await _http_one(client, url, http_case(rng), rep)

        await asyncio.gather(*(one_http() for _ in range(http_cases)))
    rep.http_cases = http_cases
    async with grpc.aio.insecure_channel(col.grpc_target) as channel:
        call = channel.unary_unary(EXPORT)

        async def one_grpc() -> None:
            async with sem:
                await _grpc_one(call, *grpc_case(rng), rep)

        await asyncio.gather(*(one_grpc() for _ in range(grpc_cases)))
        if grpc_cases:  # over the size cap: RESOURCE_EXHAUSTED from grpc itself, not a crash
            try:
                await call(os.urandom(MAX_BODY + 1024), timeout=TIMEOUT_S)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            rep.note("grpc-oversized", f"grpc-{code.name}")
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                rep.server_errors.append(f"grpc oversized: {code.name}")
    rep.grpc_cases = grpc_cases
    await _lying_headers(col, rep)
    if memory_cases:
        await _memory_stream(col, rep, memory_cases)
    rep.crashed = not col.alive()
    if not rep.crashed:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            rep.healthy_after = (await client.get(f"{col.http}/healthz")).status_code == 200
        rep.canary_stored = await canary_stored(col, f"canary-{seed}")
        if rep.multi_member_sent:  # every member of every accepted body was stored
            found = await stored_cids(col, rep.multi_member_sent)
            rep.multi_member_missing = [c for c in rep.multi_member_sent if c not in found]
    rep.seconds = time.monotonic() - t0
    return rep
