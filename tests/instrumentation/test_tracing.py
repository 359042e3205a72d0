"""Tracing setup: spans leave through a real OTLP exporter (gRPC and HTTP) to an in-test receiver;
a collector that is unreachable never slows or breaks the caller, and drops are counted."""

from __future__ import annotations

import socket
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hoptrace.contract import conventions as c
from hoptrace.instrumentation import (
    configure_tracing,
    correlation_context,
    export_stats,
    flush_tracing,
    load_spec,
    shutdown_tracing,
    step_span,
)
from hoptrace.instrumentation.tracing import get_tracer

from ..support import REFERENCE_SPEC, unique, wait_for
from .otlp_receiver import GrpcReceiver, HttpReceiver


@pytest.fixture(autouse=True)
def _reset_tracing():
    yield
    shutdown_tracing(timeout_s=2.0)


@pytest.mark.parametrize(
    ("receiver_cls", "protocol"), [(GrpcReceiver, "grpc"), (HttpReceiver, "http/protobuf")]
)
async def test_spans_reach_an_otlp_receiver(receiver_cls, protocol) -> None:
    spec = load_spec(REFERENCE_SPEC)
    cid = unique("pay-")
    with receiver_cls() as receiver:
        provider = configure_tracing(
            "hoptrace-tests",
            endpoint=receiver.endpoint,
            protocol=protocol,
            schedule_delay_millis=50,
        )
        assert trace.get_tracer_provider() is provider
        with step_span(spec, "payment.confirmed", cid, **{"payment.amount": 10}):
            with get_tracer().start_as_current_span("child"):
                pass
        assert flush_tracing(5.0)
        await wait_for(lambda: _has(receiver, "child"), what="spans at the receiver")
        step = receiver.received.named("payment.confirmed")[0]
        child = receiver.received.named("child")[0]
    assert step.attributes[c.ATTR_CORRELATION_ID] == cid
    assert step.attributes[c.ATTR_OUTCOME] == "ok"
    assert step.attributes[c.ATTR_PIPELINE] == "payments"
    assert step.attributes["payment.amount"] == 10
    assert child.attributes[c.ATTR_CORRELATION_ID] == cid  # via baggage, BaggageSpanProcessor
    assert child.parent_span_id == step.span_id and child.trace_id == step.trace_id
    # the resource is fixed by the first configure_tracing in the process
    assert step.service == provider.resource.attributes["service.name"]
    assert export_stats()["exported"] >= 2


def test_configure_is_idempotent_and_swaps_exporters() -> None:
    a, b = InMemorySpanExporter(), InMemorySpanExporter()
    p1 = configure_tracing("hoptrace-tests", exporter=a, simple=True)
    assert configure_tracing("hoptrace-tests", exporter=a, simple=True) is p1
    assert configure_tracing("hoptrace-tests") is p1  # plain re-call keeps what is set up
    with get_tracer().start_as_current_span("one"):
        pass
    assert configure_tracing("hoptrace-tests", exporter=b, simple=True) is p1
    with get_tracer().start_as_current_span("two"):
        pass
    assert [s.name for s in a.get_finished_spans()] == ["one"]
    assert [s.name for s in b.get_finished_spans()] == ["two"]


def test_only_the_correlation_baggage_becomes_an_attribute() -> None:
    from opentelemetry import baggage, context

    mem = InMemorySpanExporter()
    configure_tracing("hoptrace-tests", exporter=mem, simple=True)
    token = context.attach(baggage.set_baggage("user.email", "x@example.com"))
    try:
        with correlation_context("pay-7"), get_tracer().start_as_current_span("s"):
            pass
    finally:
        context.detach(token)
    (span,) = mem.get_finished_spans()
    assert span.attributes[c.ATTR_CORRELATION_ID] == "pay-7"
    assert "user.email" not in span.attributes


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_unreachable_collector_never_blocks_or_raises(protocol, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    before = export_stats()
    configure_tracing(
        "hoptrace-tests",
        endpoint=f"http://127.0.0.1:{_closed_port()}",
        protocol=protocol,
        max_queue_size=64,
        max_export_batch_size=32,
        schedule_delay_millis=10,
        hold_s=0,
    )
    spec = load_spec(REFERENCE_SPEC)
    n = 3000
    t0 = time.perf_counter()
    for i in range(n):
        with step_span(spec, "payment.confirmed", f"pay-{i}"):
            pass
    elapsed = time.perf_counter() - t0
    assert elapsed / n < 0.001, f"{elapsed / n * 1e6:.0f} us per span with the collector down"
    after = export_stats()
    assert after["dropped_queue_full"] > before["dropped_queue_full"]
    await wait_for(
        lambda: _async(export_stats()["export_failed"] > before["export_failed"]),
        timeout=15,
        what="a counted export failure",
    )
    # after a failed export, batches are dropped unseen for a cool-down (no encode, no connect)
    await wait_for(
        lambda: _async(export_stats()["skipped_unreachable"] > before["skipped_unreachable"]),
        timeout=15,
        what="batches skipped while the collector is unreachable",
    )
    t0 = time.perf_counter()
    shutdown_tracing(timeout_s=1.0)
    assert time.perf_counter() - t0 < 3.0


async def test_slow_collector_never_blocks(monkeypatch) -> None:
    """The collector answers, but only after 5 s per batch: spans queue up and drop (counted);
    the caller keeps its speed."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "10")
    spec = load_spec(REFERENCE_SPEC)
    with GrpcReceiver(delay_s=5.0) as receiver:
        before = export_stats()
        configure_tracing(
            "hoptrace-tests",
            endpoint=receiver.endpoint,
            protocol="grpc",
            max_queue_size=64,
            max_export_batch_size=32,
            schedule_delay_millis=10,
        )
        n = 3000
        t0 = time.perf_counter()
        for i in range(n):
            with step_span(spec, "payment.confirmed", f"pay-{i}"):
                pass
        elapsed = time.perf_counter() - t0
        assert elapsed / n < 0.001, f"{elapsed / n * 1e6:.0f} us per span with a slow collector"
        assert export_stats()["dropped_queue_full"] > before["dropped_queue_full"] + n // 2
        t0 = time.perf_counter()
        shutdown_tracing(timeout_s=1.0)
        assert time.perf_counter() - t0 < 3.0


async def _async(value: object) -> object:
    return value


async def _has(receiver, name: str) -> bool:
    return bool(receiver.received.named(name))


def test_sdk_disabled_is_a_noop(tmp_path) -> None:
    """OTEL_SDK_DISABLED=true: no spans recorded, no library instrumented, nothing raised."""
    import subprocess
    import sys

    code = (
        "from hoptrace.instrumentation import configure_tracing, step_span, load_spec\n"
        "from hoptrace.instrumentation.tracing import export_stats\n"
        "from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor\n"
        f"spec = load_spec({str(REFERENCE_SPEC)!r})\n"
        "configure_tracing('x')\n"
        "with step_span(spec, 'payment.confirmed', 'p-1') as s:\n"
        "    assert not s.is_recording()\n"
        "assert not AIOKafkaInstrumentor().is_instrumented_by_opentelemetry\n"
        "assert export_stats()['ended'] == 0\n"
        "print('OK')\n"
    )
    import os

    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"
