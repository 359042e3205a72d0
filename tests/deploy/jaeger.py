"""A real Jaeger v2 (tools/jaeger, `go install`-built, in-memory storage) on free loopback ports,
and helpers to read traces back through its HTTP query API."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from ..support import free_port
from .gotools import clean_env, go_tool

CONFIG = Path(__file__).resolve().parent / "jaeger-test.yaml"
CORRELATION = "hoptrace.correlation_id"
ALL_SERVICES = {
    "payment-service",
    "purchase-worker",
    "allocation-worker",
    "session-worker",
    "admin-service",
}
T = TypeVar("T")


def poll(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Re-evaluate ``check`` until it returns a truthy value (or fail saying ``what``)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@dataclass
class Jaeger:
    proc: subprocess.Popen[bytes]
    log: Path
    query_port: int
    otlp_grpc_port: int
    otlp_http_port: int
    health_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.query_port}"

    @property
    def otlp_grpc(self) -> str:
        return f"http://127.0.0.1:{self.otlp_grpc_port}"

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        resp = httpx.get(f"{self.url}{path}", params=params, timeout=5.0, trust_env=False)
        resp.raise_for_status()
        return resp.json()

    def find(self, service: str, tags: dict[str, str], limit: int = 20) -> list[dict[str, Any]]:
        """`/api/traces?service=...&tags={...}`: the traces a tag search finds."""
        return (
            self.get(
                "/api/traces", service=service, tags=json.dumps(tags), lookback="1h", limit=limit
            )["data"]
            or []
        )

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_jaeger(workdir: Path, timeout: float = 60.0) -> Jaeger:
    """Start the jaeger binary (built by scripts/go-tools.sh if missing) and wait for its API."""
    binary = go_tool("jaeger")
    ports = {
        "JAEGER_QUERY_HTTP_PORT": free_port(),
        "JAEGER_QUERY_GRPC_PORT": free_port(),
        "JAEGER_OTLP_GRPC_PORT": free_port(),
        "JAEGER_OTLP_HTTP_PORT": free_port(),
        "JAEGER_HEALTH_PORT": free_port(),
    }
    log = workdir / "jaeger.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(binary), f"--config={CONFIG}"],
            env=clean_env({k: str(v) for k, v in ports.items()}),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    jaeger = Jaeger(
        proc,
        log,
        ports["JAEGER_QUERY_HTTP_PORT"],
        ports["JAEGER_OTLP_GRPC_PORT"],
        ports["JAEGER_OTLP_HTTP_PORT"],
        ports["JAEGER_HEALTH_PORT"],
    )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"jaeger exited ({proc.returncode}):\n{jaeger.tail()}")
        try:
            jaeger.get("/api/services")
            return jaeger
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                jaeger.stop()
                raise AssertionError(f"jaeger API not up in {timeout}s:\n{jaeger.tail()}") from None
            time.sleep(0.1)


def spans_by_id(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["spanID"]: s for s in trace["spans"]}


def services_of(trace: dict[str, Any]) -> set[str]:
    procs = trace["processes"]
    return {procs[s["processID"]]["serviceName"] for s in trace["spans"]}


def roots(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """Spans with no parent inside the trace (a connected trace has exactly one)."""
    ids = spans_by_id(trace)
    out = []
    for span in trace["spans"]:
        parents = [r["spanID"] for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
        if not any(p in ids for p in parents):
            out.append(span)
    return out


def tag(span: dict[str, Any], key: str) -> Any:
    for t in span.get("tags", []):
        if t["key"] == key:
            return t["value"]
    return None


def wait_for_payment_trace(
    jaeger: Jaeger, cid: str, step_ids: set[str], timeout: float = 60.0
) -> dict[str, Any]:
    """The payment's trace once spans of every service and every step have reached Jaeger."""

    def complete() -> dict[str, Any] | None:
        traces = jaeger.find("payment-service", {CORRELATION: cid})
        done = [t for t in traces if services_of(t) >= ALL_SERVICES]
        steps = {tag(s, "hoptrace.step") for t in traces for s in t["spans"]}
        return done[0] if done and step_ids <= steps else None

    return poll(complete, timeout, f"payment {cid} in Jaeger from {sorted(ALL_SERVICES)}")
