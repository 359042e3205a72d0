"""Test harness for the reference pipeline: an in-test OTLP/HTTP receiver that keeps every
exported span, and the services started as users start them (`hoptrace worker NAME`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from hoptrace.workers.registry import SERVICES

from ..support import free_port

HOPTRACE = str(Path(sys.executable).parent / "hoptrace")
#: The services in the registry's order (a service before the one calling it).
ORDER = list(SERVICES)


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    attributes: dict[str, object]
    status_code: int


def _value(v: object) -> object:
    kind = v.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    """OTLP/HTTP protobuf receiver on a free port; ``spans`` grows as the services export.
    ``delay_s``: each export is kept that long before it is taken (recorded and answered), as
    a slow collector would; ``port``: listen there (a collector back on its address)."""

    def __init__(self, delay_s: float = 0.0, port: int = 0) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                if delay_s:
                    time.sleep(delay_s)
                receiver._add(req)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _add(self, req: ExportTraceServiceRequest) -> None:
        out: list[Span] = []
        for rs in req.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(res.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        Span(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            service=service,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status_code=s.status.code,
                        )
                    )
        with self._lock:
            self.spans.extend(out)

    def for_correlation(self, cid: str) -> list[Span]:
        with self._lock:
            spans = list(self.spans)
        traces = {s.trace_id for s in spans if s.attributes.get("hoptrace.correlation_id") == cid}
        return [s for s in spans if s.trace_id in traces]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Services:
    """The reference services as subprocesses (`hoptrace worker NAME`), each with its log."""

    env: dict[str, str]
    workdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    faults: dict[str, str | None] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, name: str, fault: str | None = None, timeout: float = 45.0) -> subprocess.Popen:
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is running"
        ready = self.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        env = {**self.env, "HOPTRACE_READY_FILE": str(ready), "HOPTRACE_FAULT": fault or ""}
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen(
                [HOPTRACE, "worker", name], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.procs[name] = proc
        self.faults[name] = fault
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}): {self.tail(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not ready in {timeout}s: {self.tail(name)}")
            time.sleep(0.05)
        return proc

    def tail(self, name: str, n: int = 15) -> str:
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, name: str, timeout: float = 20.0) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def restart(self, name: str, fault: str | None = None) -> None:
        if name in self.procs:
            self.stop(name)
        self.start(name, fault)

    def start_all(self) -> None:
        for name in ORDER:
            self.start(name)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def service_env(
    db_url: str, bootstrap: str, spec: Path, otlp: OtlpReceiver | None
) -> dict[str, str]:
    env = {
        **os.environ,
        "HOPTRACE_DATABASE_URL": db_url,
        "HOPTRACE_KAFKA_BOOTSTRAP": bootstrap,
        "HOPTRACE_PIPELINE": str(spec),
        "HOPTRACE_PAYMENT_SERVICE_PORT": str(free_port()),
        "HOPTRACE_ADMIN_SERVICE_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    if otlp is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.endpoint
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    else:
        env["OTEL_TRACES_EXPORTER"] = "none"
    return env


async def count(db_url: str, table: str, cid: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM {table} WHERE correlation_id = $1", cid)  # noqa: S608
    finally:
        await conn.close()


async def fetchval(db_url: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def group_members(bootstrap: str, group: str) -> int:
    """How many members the consumer group has right now (0 if it does not exist)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.describe_consumer_groups([group])
        groups = resp[0].to_object()["groups"]
        return sum(len(g["members"]) for g in groups if g["group"] == group)
    finally:
        await admin.close()


async def committed(bootstrap: str, group: str, topic: str) -> int:
    """Sum of the group's committed offsets on ``topic`` (0 when none)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return sum(m.offset for tp, m in offsets.items() if tp.topic == topic and m.offset > 0)
    finally:
        await admin.close()


async def read_topic(bootstrap: str, topic: str, timeout_ms: int = 1000) -> list[object]:
    """Every record currently on ``topic`` (no group, from the beginning)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        out: list[object] = []
        batch = await consumer.getmany(timeout_ms=timeout_ms)
        while batch:
            for records in batch.values():
                out.extend(records)
            batch = await consumer.getmany(timeout_ms=300)
        return out
    finally:
        await consumer.stop()


def header(record: object, key: str) -> str | None:
    for k, v in getattr(record, "headers", None) or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


async def produce(bootstrap: str, topic: str, value: bytes, headers: list | None = None) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, headers=headers or [])
    finally:
        await producer.stop()
