"""The Jaeger peers of the ingest benchmark: Jaeger v2 (``.hoptrace/tools/bin/jaeger``, an
OpenTelemetry Collector build) receiving the same OTLP/HTTP load, with its in-memory storage or
with Badger (its embedded persistent key-value store, in a temporary directory,
``ephemeral: false``: spans are written to disk as Jaeger does in production without an external
database). Its spans are counted by its own exporter metric (``otelcol_exporter_sent_spans``);
CPU is the Jaeger process's (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import free_port, stop_process  # benchmarks/
from ingest_load import collect, start_load
from ingest_measure import proc_cpu, settled

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

_CONFIG = """
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
      traces: store
    http:
      endpoint: 127.0.0.1:${env:JAEGER_QUERY_HTTP_PORT}
    grpc:
      endpoint: 127.0.0.1:${env:JAEGER_QUERY_GRPC_PORT}
  jaeger_storage:
    backends:
      store:
STORAGE
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:${env:JAEGER_OTLP_HTTP_PORT}
processors:
  batch:
exporters:
  jaeger_storage_exporter:
    trace_storage: store
"""
_MEMORY = """        memory:
          max_traces: 2000000"""
_BADGER = """        badger:
          directories:
            keys: ${env:JAEGER_BADGER_DIR}/keys
            values: ${env:JAEGER_BADGER_DIR}/values
          ephemeral: false
          ttl:
            spans: 48h"""
STORAGES = {"memory": _MEMORY, "badger": _BADGER}


def config(storage: str) -> str:
    """Jaeger v2's configuration with ``storage`` (``memory`` or ``badger``) as its trace store."""
    return _CONFIG.replace("STORAGE", STORAGES[storage])


def _disk_bytes(folder: Path) -> int:
    """Bytes allocated on disk (Badger preallocates its value log: the apparent size is ~2 GB)."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


@dataclass
class Jaeger:
    """A running Jaeger v2 process: its ports, pid and data folder."""

    storage: str
    proc: subprocess.Popen  # type: ignore[type-arg]
    ports: dict[str, int]
    data: Path

    @property
    def query(self) -> str:
        """Its query service (the UI's HTTP API, ``/api/traces``)."""
        return f"http://127.0.0.1:{self.ports['QUERY_HTTP']}"

    async def exported(self, http: httpx.AsyncClient) -> float:
        """Spans its exporter has written to storage so far."""
        total = 0.0
        metrics = f"http://127.0.0.1:{self.ports['METRICS']}/metrics"
        for line in (await http.get(metrics)).text.splitlines():
            if line.startswith("otelcol_exporter_sent_spans"):
                total += float(line.split()[-1])
        return total


BINARY = ROOT / ".hoptrace" / "tools" / "bin" / "jaeger"


def not_built() -> dict[str, str] | None:
    """A peer's result when Jaeger is not built (None when it is)."""
    if BINARY.exists():
        return None
    return {"skipped": f"{BINARY} not built (scripts/go-tools.sh jaeger)"}


@asynccontextmanager
async def running_jaeger(storage: str, tag: str = "ingest") -> AsyncIterator[Jaeger]:
    """Jaeger v2 (built: see :func:`not_built`) with ``storage`` (``memory`` or ``badger``), up
    and receiving; stopped (and its Badger folder removed) on exit."""
    binary = BINARY
    ports = {k: free_port() for k in ("METRICS", "QUERY_HTTP", "QUERY_GRPC", "OTLP_HTTP")}
    cfg = RESULTS / f"{tag}-jaeger-{storage}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config(storage))
    data = Path(tempfile.mkdtemp(prefix="hoptrace-bench-badger-"))
    env = {
        **os.environ,
        **{f"JAEGER_{k}_PORT": str(v) for k, v in ports.items()},
        "JAEGER_BADGER_DIR": str(data),
    }
    proc = subprocess.Popen(  # noqa: ASYNC220
        [str(binary), "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(RESULTS / f"{tag}-jaeger-{storage}.log", "w"),  # noqa: ASYNC230, SIM115
    )
    jaeger = Jaeger(storage, proc, ports, data)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(300):
                try:
                    await jaeger.exported(http)
                    with socket.create_connection(("127.0.0.1", ports["OTLP_HTTP"]), 1):
                        break
                except (httpx.HTTPError, OSError):
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"jaeger ({storage}) did not start")
        yield jaeger
    finally:
        stop_process(proc)
        shutil.rmtree(data, ignore_errors=True)


async def jaeger_run(args: argparse.Namespace, mix: str, storage: str = "memory") -> dict:
    """The load of ``mix`` against Jaeger v2 with ``storage``, at saturation."""
    if (skipped := not_built()) is not None:
        return skipped
    async with running_jaeger(storage) as jaeger, httpx.AsyncClient(timeout=5) as http:
        cpu0 = proc_cpu(jaeger.proc.pid)
        procs, out = await start_load(
            jaeger.ports["OTLP_HTTP"], mix, args.spans, args.workers, args.concurrency
        )
        t0 = time.perf_counter()
        samples: list[tuple[float, float]] = []
        while time.perf_counter() - t0 < args.timeout:
            samples.append((time.perf_counter() - t0, await jaeger.exported(http)))
            if all(not p.is_alive() for p in procs) and settled(samples):
                break
            await asyncio.sleep(0.2)
        cpu = proc_cpu(jaeger.proc.pid) - cpu0
        loads = collect(procs, out)
        disk = _disk_bytes(jaeger.data)
    sent = sum(r[0] for r in loads)
    total = samples[-1][1]
    first = next(t for t, n in samples if n > 0)
    elapsed = next(t for t, n in samples if n >= total) - first
    per = 1e6 / max(total, 1)
    result = {
        "mix": mix,
        "storage": storage,
        "spans_sent": sent,
        "spans_exported_to_storage": round(total),
        "lost": sent - round(total),
        "seconds": round(elapsed, 2),
        "spans_per_s_overall": round(total / elapsed),
        "refused": sum(r[1] for r in loads),
        "cpu_us_per_span": round(cpu * per, 1),
        "load_generator_cpu_us_per_span": round(sum(r[2] for r in loads) * per, 1),
    }
    if storage == "badger":
        result["badger_bytes_allocated_on_disk"] = disk
    return result
