"""Jaeger interop: the reference pipeline (payment-service, admin-service and the three workers,
started as users start them, on the real Kafka and PostgreSQL) exports OTLP to a real Jaeger v2
built with `go install`; one payment is one connected trace spanning every service in Jaeger,
a tag search by `hoptrace.correlation_id` finds it, and the link `hoptrace trace` prints for it
names that trace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import unique

from .gotools import timeout_for
from .jaeger import (
    ALL_SERVICES,
    CORRELATION,
    Jaeger,
    roots,
    services_of,
    spans_by_id,
    tag,
    wait_for_payment_trace,
)
from .pipeline import Pipeline, running_pipeline

pytestmark = timeout_for("jaeger", 240)


@pytest.fixture(scope="module")
def pipeline(
    admin_db_url: str,
    kafka_bootstrap: str,
    jaeger: Jaeger,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    """Own database, topics and groups; every service exports OTLP/gRPC straight to Jaeger."""
    with running_pipeline(
        admin_db_url, kafka_bootstrap, tmp_path_factory.mktemp("interop"), jaeger.otlp_grpc
    ) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def payment(pipeline: Pipeline, jaeger: Jaeger) -> tuple[str, dict[str, Any]]:
    """One payment run end to end; its trace as Jaeger returns it once every service's spans
    have arrived."""
    cid = pipeline.pay()
    try:
        trace = wait_for_payment_trace(jaeger, cid, {st.id for st in pipeline.spec.steps})
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{pipeline.logs()}\n--- jaeger\n{jaeger.tail()}") from None
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


def test_health_endpoint_the_compose_healthcheck_probes(jaeger: Jaeger) -> None:
    """docker-compose.yml probes Jaeger's healthcheckv2 extension at /status (port 13133)."""
    url = f"http://127.0.0.1:{jaeger.health_port}/status"
    resp = httpx.get(url, timeout=5.0, trust_env=False)
    assert resp.status_code == 200, resp.text
    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    assert "http://127.0.0.1:13133/status" in compose
