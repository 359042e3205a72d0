"""The reference pipeline with two of its steps run by services hoptrace did not write, on the real
stack: payment-service, admin-service and allocation-worker as ``hoptrace worker NAME``
subprocesses, the Node.js worker (``interop/node``) in place of purchase-worker and the Java
consumer (``interop/java``) in place of session-worker, all exporting OTLP to a ``hoptrace
collector`` subprocess on free ports, in this pipeline's own database, topics and groups.

The spec is the reference one (``tests.support.isolated_spec``) with two changes: the Node and
Java steps name their services (``NODE_SERVICE``, ``JAVA_SERVICE``) and their processed marks'
own tables (``NODE_PROCESSED``, ``JAVA_PROCESSED``); a key-only pipeline also declares
``[pipeline.correlation] baggage = false, message_key = true``."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from hoptrace.collector import api, store
from hoptrace.collector.api import Diagnosis
from hoptrace.contract import PipelineSpec, load_spec
from hoptrace.settings import Settings
from hoptrace.workers.client import submit

from ..support import create_database, delete_topics, drop_database, free_port, isolated_spec
from ..workers.harness import HOPTRACE, ORDER, Services, service_env
from .harness import ARTIFACTS, Service, ServiceEnv, build

NODE_SERVICE = "node-purchase-worker"
JAVA_SERVICE = "java-session-worker"
NODE_STEP = "purchase.created"
JAVA_STEP = "session.created"
#: The reference services that keep running as they are (registry order): all but the two
#: workers the interop services replace.
PYTHON_SERVICES = tuple(s for s in ORDER if s not in ("purchase-worker", "session-worker"))
#: interop service -> the step it runs
STEP_OF = {"node": NODE_STEP, "java": JAVA_STEP}
#: Where the Node worker and the Java consumer keep their processed marks (each creates its table
#: at start; see interop/README.md), as the spec declares them.
NODE_PROCESSED = (
    '{ table = "node_processed", event_id_column = "msg_id", event_type_column = "kind", '
    'correlation_column = "payment_ref", source_column = "handler", '
    'processed_at_column = "handled_at" }'
)
JAVA_PROCESSED = (
    '{ table = "java_handled", event_id_column = "event_ref", event_type_column = "event_kind", '
    'correlation_column = "payment", source_column = "worker", processed_at_column = "at" }'
)
KEY_ONLY = "\n[pipeline.correlation]\nbaggage = false\nmessage_key = true\n"
#: OpenTelemetry's propagators without baggage: only traceparent crosses a hop.
NO_BAGGAGE = {"OTEL_PROPAGATORS": "tracecontext"}


def mixed_spec(tmp: Path, suffix: str, key_only: bool = False) -> Path:
    """The reference spec with its own topics and groups, purchase.created run by the Node
    worker and session.created by the Java consumer (their services and processed tables)."""
    path = isolated_spec(tmp, suffix)
    head, *steps = path.read_text().split("[[steps]]")
    replaced = {
        NODE_STEP: (NODE_SERVICE, NODE_PROCESSED),
        JAVA_STEP: (JAVA_SERVICE, JAVA_PROCESSED),
    }
    out = []
    for block in steps:
        sid = re.search(r'^id\s*=\s*"([^"]+)"', block, flags=re.M)
        assert sid, block
        if sid.group(1) in replaced:
            service, processed = replaced[sid.group(1)]
            block, n = re.subn(
                r'^service\s*=\s*"[^"]+"', f'service = "{service}"', block, flags=re.M
            )
            assert n == 1, block
            block = block.rstrip("\n") + f"\nprocessed = {processed}\n\n"
        out.append(block)
    if key_only:
        head = head.rstrip("\n") + "\n" + KEY_ONLY + "\n"
    path.write_text("[[steps]]".join([head, *out]))
    return path


def start_collector(env: Mapping[str, str], workdir: Path) -> subprocess.Popen[bytes]:
    """``hoptrace collector`` with ``env``, once it wrote its ready file."""
    ready = workdir / "collector.ready"
    ready.unlink(missing_ok=True)
    with open(workdir / "collector.log", "ab") as log:
        proc = subprocess.Popen(
            [HOPTRACE, "collector"],
            env={**env, "HOPTRACE_READY_FILE": str(ready)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 45
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((workdir / "collector.log").read_text()[-3000:])
        time.sleep(0.05)
    return proc


@dataclass
class Mixed:
    """One running mixed pipeline (see module doc)."""

    label: str
    db_name: str
    db_url: str
    bootstrap: str
    spec_path: Path
    spec: PipelineSpec
    workdir: Path
    env: dict[str, str]  # the Python services' (and the CLI's) environment
    grpc_port: int
    http_port: int
    node_protocol: str
    node_carrier: str
    java_options: dict[str, str]
    python: Services
    collector: subprocess.Popen[bytes] | None = None
    interop: dict[str, Service] = field(default_factory=dict)
    faults: dict[str, str | None] = field(default_factory=dict)
    #: extra environment of every interop service (e.g. NO_BAGGAGE)
    interop_extra: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ settings and CLI

    def settings(self) -> Settings:
        return Settings(
            database_url=self.db_url, kafka_bootstrap=self.bootstrap, pipeline=self.spec_path
        )

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [HOPTRACE, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def trace(self, cid: str) -> dict[str, Any]:
        """``hoptrace trace CID --format json``, parsed."""
        res = self.cli("trace", cid, "--format", "json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def trace_text(self, cid: str) -> str:
        res = self.cli("trace", cid)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def stalls(self) -> list[dict[str, Any]]:
        """``hoptrace stalls --json``: what the collector's correlation state says is stuck."""
        res = self.cli("stalls", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    async def pay(self) -> str:
        """One payment through payment-service's API (what ``hoptrace pay`` does)."""
        url = f"http://127.0.0.1:{self.env['HOPTRACE_PAYMENT_SERVICE_PORT']}"
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
            return await submit(client, "student-7", "course-3", "49.00")

    async def wait_cause(
        self, cid: str, cause: str, at: str | None = None, timeout: float = 60.0
    ) -> Diagnosis:
        """Poll the lookup (in process, the API ``hoptrace trace`` uses) until it names
        ``cause`` (at step ``at``)."""
        deadline = time.monotonic() + timeout
        last: Diagnosis | None = None
        while time.monotonic() < deadline:
            last = await api.diagnose(cid, settings=self.settings(), spec=self.spec)
            if last.cause == cause and (at is None or last.stopped_at == at):
                return last
            await asyncio.sleep(0.3)
        raise AssertionError(
            f"{self.label} {cid}: cause {cause!r} at {at} not reached in {timeout}s; last: "
            f"{last and last.cause} at {last and last.stopped_at}: {last and last.evidence}\n"
            f"{self.logs()}"
        )

    async def correlation(self, cid: str) -> store.CorrelationRow | None:
        """The collector's correlation state of ``cid`` (what it derived at ingest)."""
        conn = await asyncpg.connect(self.db_url)
        try:
            return await store.correlation(conn, cid)  # type: ignore[arg-type]
        finally:
            await conn.close()

    async def wait_row(
        self,
        cid: str,
        check: Callable[[store.CorrelationRow], bool],
        what: str,
        timeout: float = 30.0,
    ) -> store.CorrelationRow:
        """The correlation state once ``check`` holds (the collector folds spans as they come)."""
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            row = await self.correlation(cid)
            if row is not None and check(row):
                return row
            await asyncio.sleep(0.2)
        raise AssertionError(f"{self.label} {cid}: ingest state never {what}: {row}")

    async def wait_state(self, cid: str, state: str, timeout: float = 30.0) -> store.CorrelationRow:
        return await self.wait_row(cid, lambda r: r.state == state, state, timeout)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.db_url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    # ------------------------------------------------------------------ interop services

    def interop_env(self, name: str, fault: str | None) -> ServiceEnv:
        step = self.spec.step(STEP_OF[name])
        assert step.consumes and step.group
        node = name == "node"
        protocol = self.node_protocol if node else "http/protobuf"
        port = self.grpc_port if protocol == "grpc" else self.http_port
        return ServiceEnv(
            bootstrap=self.bootstrap,
            database_url=self.db_url,
            consume_topic=step.consumes,
            group=step.group,
            service_name=step.service,
            otlp_endpoint=f"http://127.0.0.1:{port}",
            otlp_protocol=protocol,
            emit_topic=step.emits if node else None,
            carrier=self.node_carrier if node else None,
            fault=fault,
            extra={**self.interop_extra, **({} if node else self.java_options)},
        )

    def start_interop(self, *names: str, fault: str | None = None) -> None:
        """Start the named interop services (all at once) and wait until each is READY."""
        started = []
        for name in names:
            assert name not in self.interop, f"{name} is running"
            self.interop[name] = Service(name, self.interop_env(name, fault))
            self.faults[name] = fault
            started.append(self.interop[name])
        for service in started:
            service.wait_ready(180)

    def stop_interop(self, name: str) -> int:
        service = self.interop.pop(name)
        self._keep_log(name, service)
        return service.stop()

    def ensure(self, name: str, fault: str | None = None) -> None:
        """``name`` running with exactly ``fault`` (restarted when it differs)."""
        service = self.interop.get(name)
        if service is not None and service.alive() and self.faults.get(name) == fault:
            return
        if service is not None:
            self.stop_interop(name)
        self.start_interop(name, fault=fault)

    def _keep_log(self, name: str, service: Service) -> None:
        log = ARTIFACTS / f"interop-pipeline-{self.label}-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(f"--- fault {self.faults.get(name)}\n{service.log()}\n")

    def logs(self, lines: int = 15) -> str:
        """The tails of every log, for a failure message."""
        parts = []
        for name in PYTHON_SERVICES:
            parts.append(f"--- {name}\n{self.python.tail(name, lines)}")
        for name, service in self.interop.items():
            parts.append(f"--- {name}\n" + "\n".join(service.log().splitlines()[-lines:]))
        collector = self.workdir / "collector.log"
        if collector.exists():
            tail = collector.read_text(errors="replace").splitlines()[-lines:]
            parts.append("--- collector\n" + "\n".join(tail))
        return "\n".join(parts)

    # ------------------------------------------------------------------ life cycle

    def close(self, admin_db_url: str) -> None:
        """Stop everything, then delete the topics and drop the database (also when a stop
        fails)."""
        try:
            for name in list(self.interop):
                try:
                    self.stop_interop(name)
                except AssertionError:
                    pass  # killed; its log is kept
            self.python.stop_all()
            if self.collector is not None:
                self.collector.terminate()
                try:
                    self.collector.wait(20)
                except subprocess.TimeoutExpired:
                    self.collector.kill()
                    self.collector.wait()
        finally:
            try:
                asyncio.run(delete_topics(self.bootstrap, self.spec.topics))
            finally:
                asyncio.run(drop_database(admin_db_url, self.db_name))


def open_mixed(
    label: str,
    admin_db_url: str,
    bootstrap: str,
    workdir: Path,
    suffix: str,
    *,
    key_only: bool = False,
    node_protocol: str = "grpc",
    node_carrier: str = "baggage",
    java_options: dict[str, str] | None = None,
    python_extra: dict[str, str] | None = None,
    interop_extra: dict[str, str] | None = None,
) -> Mixed:
    """The pipeline's spec, database and environment, nothing started yet (``start`` does); the
    caller closes it (``Mixed.close``), also when ``start`` fails."""
    build()
    for old_log in ARTIFACTS.glob(f"interop-pipeline-{label}-*.log"):
        old_log.unlink()  # the previous run's
    spec_path = mixed_spec(workdir, suffix, key_only=key_only)
    spec = load_spec(spec_path)
    db_name = f"hoptrace_i_{suffix}"
    db_url = asyncio.run(create_database(admin_db_url, db_name))
    grpc, http = free_port(), free_port()
    env = service_env(db_url, bootstrap, spec_path, None)
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.update(
        {
            "HOPTRACE_OTLP_GRPC_PORT": str(grpc),
            "HOPTRACE_OTLP_HTTP_PORT": str(http),
            "HOPTRACE_STALL_SCAN_INTERVAL": "0.5",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{http}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "HOPTRACE_JAEGER_URL": "http://jaeger.test:16686",
            **(python_extra or {}),
        }
    )
    return Mixed(
        label=label,
        db_name=db_name,
        db_url=db_url,
        bootstrap=bootstrap,
        spec_path=spec_path,
        spec=spec,
        workdir=workdir,
        env=env,
        grpc_port=grpc,
        http_port=http,
        node_protocol=node_protocol,
        node_carrier=node_carrier,
        java_options=dict(java_options or {}),
        python=Services(env, workdir),
        interop_extra=dict(interop_extra or {}),
    )


def start(mixed: Mixed) -> Mixed:
    """Ensure the topics, then start everything, overlapping what waits: the Java consumer and the
    Node worker first (the JVM takes longest; neither needs the collector to join its group),
    the collector, then the Python services together (each migrates the reference schema under
    an advisory lock before it is ready)."""
    res = mixed.cli("topics", "ensure")
    assert res.returncode == 0, f"hoptrace topics ensure: {res.stderr}"
    launched = []
    for name in ("java", "node"):
        mixed.interop[name] = Service(name, mixed.interop_env(name, None))
        mixed.faults[name] = None
        launched.append(mixed.interop[name])
    mixed.collector = start_collector(mixed.env, mixed.workdir)
    with ThreadPoolExecutor(len(PYTHON_SERVICES)) as pool:
        for done in [pool.submit(mixed.python.start, name) for name in PYTHON_SERVICES]:
            done.result()
    for service in launched:
        service.wait_ready(180)
    return mixed
