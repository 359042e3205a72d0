"""Jaeger interop: the reference pipeline (payment-service, admin-service and the three workers,
started as users start them, on the real Kafka and PostgreSQL) exports OTLP to a real Jaeger v2
built with `go install`; one payment is one connected trace spanning every service in Jaeger,
a tag search by `hoptrace.correlation_id` finds it, and the link `hoptrace trace` prints for it
names that trace."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from hoptrace.instrumentation.spec import PipelineSpec, load_spec
from tests.support import create_database, delete_topics, drop_database, isolated_spec, unique
from tests.workers.harness import HOPTRACE, ORDER, Services, service_env

from .jaeger import Jaeger, roots, services_of, spans_by_id, start_jaeger, tag

pytestmark = pytest.mark.timeout(240)

CORRELATION = "hoptrace.correlation_id"
ALL_SERVICES = set(ORDER)
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
class Pipeline:
    spec: PipelineSpec
    env: dict[str, str]
    services: Services

    def pay(self) -> str:
        res = subprocess.run(
            [HOPTRACE, "pay", "--student", unique("student-"), "--course", "course-1"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    j = start_jaeger(tmp_path_factory.mktemp("jaeger"))
    try:
        yield j
    finally:
        j.stop()


@pytest.fixture(scope="module")
def pipeline(
    admin_db_url: str,
    kafka_bootstrap: str,
    jaeger: Jaeger,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    """Own database, own topics and groups; every service exports OTLP/gRPC to Jaeger."""
    tmp: Path = tmp_path_factory.mktemp("interop")
    name = unique("hoptrace_j_")
    db_url = asyncio.run(create_database(admin_db_url, name))
    spec_path = isolated_spec(tmp, unique(""))
    spec = load_spec(spec_path)
    env = service_env(db_url, kafka_bootstrap, spec_path, None)
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.pop("OTEL_SERVICE_NAME", None)
    env.pop("OTEL_SDK_DISABLED", None)
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_grpc,
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    services = Services(env, tmp)
    try:
        res = subprocess.run(
            [HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr
        services.start_all()
        yield Pipeline(spec, env, services)
    finally:
        services.stop_all()
        asyncio.run(delete_topics(kafka_bootstrap, spec.topics))
        asyncio.run(drop_database(admin_db_url, name))


@pytest.fixture(scope="module")
def payment(pipeline: Pipeline, jaeger: Jaeger) -> tuple[str, dict[str, Any]]:
    """One payment run end to end; its trace as Jaeger returns it once every service's spans
    have arrived."""
    cid = pipeline.pay()

    def complete() -> dict[str, Any] | None:
        traces = jaeger.find("payment-service", {CORRELATION: cid})
        done = [t for t in traces if services_of(t) >= ALL_SERVICES]
        steps = {tag(s, "hoptrace.step") for t in traces for s in t["spans"]}
        return done[0] if done and {s.id for s in pipeline.spec.steps} <= steps else None

    try:
        trace = poll(complete, 60, f"payment {cid} in Jaeger from {sorted(ALL_SERVICES)}")
    except AssertionError as exc:
        logs = "\n".join(f"--- {n}\n{pipeline.services.tail(n)}" for n in ORDER)
        raise AssertionError(f"{exc}\n{logs}\n--- jaeger\n{jaeger.tail()}") from None
    return cid, trace


def test_payment_is_one_connected_trace_spanning_every_service(
    payment: tuple[str, dict[str, Any]], jaeger: Jaeger
) -> None:
    cid, trace = payment
    found = jaeger.find("payment-service", {CORRELATION: cid})
    assert [t["traceID"] for t in found] == [trace["traceID"]], "the payment is split over traces"
    assert services_of(trace) == ALL_SERVICES
    (root,) = roots(trace)  # one root: every other span's parent is in the trace
    assert services_of({"spans": [root], "processes": trace["processes"]}) == {"payment-service"}
    ids = spans_by_id(trace)
    for span in trace["spans"]:
        for ref in span.get("references", []):
            assert ref["traceID"] == trace["traceID"]
            assert ref["spanID"] in ids, f"{span['operationName']}: parent outside the trace"


def test_every_step_span_carries_the_correlation_id(
    payment: tuple[str, dict[str, Any]], pipeline: Pipeline
) -> None:
    cid, trace = payment
    procs = trace["processes"]
    for step in pipeline.spec.steps:
        spans = [s for s in trace["spans"] if s["operationName"] == step.id]
        assert spans, f"no span named {step.id}"
        for span in spans:
            assert tag(span, CORRELATION) == cid
            assert tag(span, "hoptrace.step") == step.id
            assert tag(span, "hoptrace.step.outcome") == "ok"
            assert procs[span["processID"]]["serviceName"] == step.service


@pytest.mark.parametrize("service", sorted(ALL_SERVICES))
def test_tag_search_finds_the_payment_from_every_service(
    payment: tuple[str, dict[str, Any]], jaeger: Jaeger, service: str
) -> None:
    cid, trace = payment
    found = jaeger.find(service, {CORRELATION: cid})
    assert [t["traceID"] for t in found] == [trace["traceID"]]


def test_tag_search_for_another_id_finds_nothing(
    payment: tuple[str, dict[str, Any]], jaeger: Jaeger
) -> None:
    assert jaeger.find("payment-service", {CORRELATION: unique("no-such-payment-")}) == []


def test_hoptrace_trace_link_names_the_jaeger_trace(
    payment: tuple[str, dict[str, Any]], jaeger: Jaeger
) -> None:
    """The link format `hoptrace trace` prints (`<jaeger>/trace/<trace id>`) opens this trace:
    the id it carries is the one Jaeger stores, and the UI route answers."""
    from hoptrace.collector.render import jaeger_link

    cid, trace = payment
    link = jaeger_link(jaeger.url, trace["traceID"])
    assert link == f"{jaeger.url}/trace/{trace['traceID']}"
    trace_id = link.rsplit("/", 1)[1]
    (by_id,) = jaeger.get(f"/api/traces/{trace_id}")["data"]
    assert services_of(by_id) == ALL_SERVICES
    assert httpx.get(link, timeout=5.0, trust_env=False).status_code == 200
