"""The compose topology without Docker: the services export to an OpenTelemetry Collector
running the SHIPPED collector/otelcol-config.yaml (real collector build, tools/otelcol), which
fans spans out to a real Jaeger v2 and to `hoptrace collector` (bearer token). One payment:
Jaeger has its whole trace, `hoptrace trace --format json` diagnoses it as completed, and the
Jaeger links it prints name that trace."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.workers.harness import HOPTRACE

from ..support import free_port
from .gotools import OTELCOL_CONFIG, clean_env, go_tool, timeout_for
from .jaeger import ALL_SERVICES, Jaeger, poll, services_of, wait_for_payment_trace
from .pipeline import Pipeline, running_pipeline

pytestmark = [timeout_for("jaeger", 240), timeout_for("otelcol", 240)]

TOKEN = "fanout-test-token"
OTLP_TOKEN = "fanout-otlp-token"  # what the services send to the OTel Collector


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    with open(log, "wb") as out:
        return Proc(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT), log)


def wait_healthy(proc: Proc, url: str, what: str, timeout: float = 60.0) -> None:
    def up() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.proc.returncode}):\n{proc.tail()}")
        try:
            return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        poll(up, timeout, f"{what} at {url}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{proc.tail()}") from None


@dataclass
class Topology:
    pipeline: Pipeline
    collector_env: dict[str, str]
    collector: Proc
    otelcol: Proc


@pytest.fixture(scope="module")
def topology(
    admin_db_url: str,
    kafka_bootstrap: str,
    jaeger: Jaeger,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp("fanout")
    otelcol_bin = go_tool("otelcol")
    otlp_grpc = free_port()
    with running_pipeline(
        admin_db_url,
        kafka_bootstrap,
        tmp,
        f"http://127.0.0.1:{otlp_grpc}",
        start=False,
        otlp_token=OTLP_TOKEN,
    ) as pipe:
        # hoptrace collector, on the pipeline's database (as in compose: one PostgreSQL).
        c_grpc, c_http = free_port(), free_port()
        collector_env = {
            **pipe.env,
            "HOPTRACE_OTLP_GRPC_PORT": str(c_grpc),
            "HOPTRACE_OTLP_HTTP_PORT": str(c_http),
            "HOPTRACE_INGEST_TOKEN": TOKEN,
            "HOPTRACE_BIND_HOST": "127.0.0.1",
            "HOPTRACE_JAEGER_URL": jaeger.url,
            "OTEL_TRACES_EXPORTER": "none",
        }
        collector = spawn([HOPTRACE, "collector"], collector_env, tmp / "collector.log")
        # The OTel Collector with the shipped config; only listen addresses and targets differ.
        otel_env = clean_env(
            {
                "OTELCOL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{otlp_grpc}",
                "OTELCOL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
                "OTELCOL_HEALTH_ENDPOINT": f"127.0.0.1:{(health := free_port())}",
                "OTELCOL_METRICS_HOST": "127.0.0.1",
                "OTELCOL_METRICS_PORT": str(free_port()),
                "JAEGER_OTLP_ENDPOINT": f"127.0.0.1:{jaeger.otlp_grpc_port}",
                "HOPTRACE_OTLP_ENDPOINT": f"127.0.0.1:{c_grpc}",
                "HOPTRACE_INGEST_TOKEN": TOKEN,
                "HOPTRACE_OTLP_TOKEN": OTLP_TOKEN,
            }
        )
        otelcol = spawn(
            [str(otelcol_bin), f"--config={OTELCOL_CONFIG}"], otel_env, tmp / "otelcol.log"
        )
        try:
            wait_healthy(collector, f"http://127.0.0.1:{c_http}/healthz", "hoptrace collector")
            wait_healthy(otelcol, f"http://127.0.0.1:{health}/", "otel collector")
            pipe.services.start_all()
            yield Topology(pipe, collector_env, collector, otelcol)
        finally:
            pipe.services.stop_all()
            otelcol.stop()
            collector.stop()


def hoptrace_trace(env: dict[str, str], cid: str) -> dict[str, Any] | None:
    res = subprocess.run(
        [HOPTRACE, "trace", cid, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if res.returncode == 2:  # not known yet
        return None
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def payment(topology: Topology, jaeger: Jaeger) -> tuple[str, dict[str, Any], dict[str, Any]]:
    pipe = topology.pipeline
    cid = pipe.pay()
    steps = {s.id for s in pipe.spec.steps}
    try:
        trace = wait_for_payment_trace(jaeger, cid, steps)
        diagnosis = poll(
            lambda: (
                (d := hoptrace_trace(topology.collector_env, cid))
                and d["state"] == "completed"
                and d
            ),
            60,
            f"`hoptrace trace {cid}` to say completed",
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n{pipe.logs()}\n--- otelcol\n{topology.otelcol.tail()}\n"
            f"--- collector\n{topology.collector.tail()}\n--- jaeger\n{jaeger.tail()}"
        ) from None
    return cid, trace, diagnosis


def test_otel_collector_delivers_the_whole_trace_to_jaeger(
    payment: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    _cid, trace, _diagnosis = payment
    assert services_of(trace) == ALL_SERVICES


def test_hoptrace_collector_gets_the_same_spans_and_diagnoses_completed(
    payment: tuple[str, dict[str, Any], dict[str, Any]], topology: Topology
) -> None:
    cid, _trace, diagnosis = payment
    assert diagnosis["correlation_id"] == cid
    assert diagnosis["stopped_at"] is None
    step_ids = [s.id for s in topology.pipeline.spec.steps]
    assert [s.get("id", s.get("step")) for s in diagnosis["steps"]] == step_ids
    assert all(s["status"] == "done" for s in diagnosis["steps"]), diagnosis["steps"]


def test_hoptrace_trace_links_open_the_jaeger_trace(
    payment: tuple[str, dict[str, Any], dict[str, Any]], jaeger: Jaeger
) -> None:
    _cid, trace, diagnosis = payment
    links = diagnosis["jaeger_urls"]
    assert links == [f"{jaeger.url}/trace/{trace['traceID']}"], links
    for link in links:
        (by_id,) = jaeger.get(f"/api/traces/{link.rsplit('/', 1)[1]}")["data"]
        assert services_of(by_id) == ALL_SERVICES
        assert httpx.get(link, timeout=5.0, trust_env=False).status_code == 200


def test_hoptrace_collector_refuses_spans_without_the_token(topology: Topology) -> None:
    """The token the OTel Collector sends is what lets spans in: without it, 401."""
    port = topology.collector_env["HOPTRACE_OTLP_HTTP_PORT"]
    resp = httpx.post(
        f"http://127.0.0.1:{port}/v1/traces",
        content=b"",
        headers={"content-type": "application/x-protobuf"},
        timeout=5.0,
        trust_env=False,
    )
    assert resp.status_code == 401


@pytest.mark.parametrize(
    "name",
    [
        "collector",
        "payment-service",
        "admin-service",
        *sorted(ALL_SERVICES - {"payment-service", "admin-service"}),
    ],
)
def test_compose_healthcheck_commands_pass_on_the_running_services(
    topology: Topology, services: dict[str, Any], name: str
) -> None:
    """Each hoptrace service's compose healthcheck, run as written against the live process
    (only the port and the ready-file path differ from the container)."""
    hc = services[name]["healthcheck"]["test"]
    assert hc[0] == "CMD"
    argv = [sys.executable if a == "python" else a for a in hc[1:]]
    env = topology.pipeline.env
    swaps = {
        "127.0.0.1:4318/": f"127.0.0.1:{topology.collector_env['HOPTRACE_OTLP_HTTP_PORT']}/",
        "127.0.0.1:8081/": f"127.0.0.1:{env['HOPTRACE_PAYMENT_SERVICE_PORT']}/",
        "127.0.0.1:8082/": f"127.0.0.1:{env['HOPTRACE_ADMIN_SERVICE_PORT']}/",
        "/tmp/hoptrace/ready": str(topology.pipeline.services.workdir / f"{name}.ready"),
    }
    for old, new in swaps.items():
        argv = [a.replace(old, new) for a in argv]
    assert argv != [sys.executable if a == "python" else a for a in hc[1:]], "nothing swapped"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
