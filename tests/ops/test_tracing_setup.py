"""Tracing set-up as a process sees it (each case in its own process: the global provider is set
once): ``OTEL_SERVICE_NAME`` wins over the name the code passes, as the OpenTelemetry standard
says; ``HOPTRACE_EXPORT_ALSO`` sends every span to a second OTLP endpoint too (the local stack's
Jaeger), without holding or counting against the export to the collector. Real OTLP/gRPC export
to real gRPC receivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..instrumentation.otlp_receiver import GrpcReceiver
from ..support import free_port

#: A traced process: one span, flushed (as an offset commit flushes: how long it took and
#: whether it succeeded), then shut down; prints export_stats() and the flush as JSON.
SCRIPT = """
import json, time
from hoptrace.instrumentation.tracing import (
    configure_tracing, export_stats, flush_tracing, get_tracer, shutdown_tracing,
)
configure_tracing("name-from-code", instrument=False, schedule_delay_millis=50)
with get_tracer().start_as_current_span("one-span"):
    pass
t0 = time.monotonic()
flushed = flush_tracing(8.0)
took = time.monotonic() - t0
shutdown_tracing(3.0)
print(json.dumps({**export_stats(), "flushed": flushed, "flush_s": took}))
"""


def traced(env: dict[str, str], timeout: float = 60) -> dict[str, int]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "HOPTRACE_EXPORT", "HOPTRACE_ACCEL"))
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**base, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "HOPTRACE_EXPORT_HOLD_S": "5", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_otel_service_name_wins_over_the_name_in_code() -> None:
    with GrpcReceiver() as collector:
        traced({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint})
        traced({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_SERVICE_NAME": "from-env"})
        traced(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-resource,team=x",
            }
        )
        services = [s.service for s in collector.received.named("one-span")]
    assert services == ["name-from-code", "from-env", "from-resource"]


def test_export_also_sends_every_span_to_a_second_endpoint() -> None:
    with GrpcReceiver() as collector, GrpcReceiver() as jaeger:
        stats = traced(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "HOPTRACE_EXPORT_ALSO": jaeger.endpoint,
            }
        )
        (to_collector,) = collector.received.named("one-span")
        (to_jaeger,) = jaeger.received.named("one-span")
    assert (to_collector.trace_id, to_collector.span_id) == (to_jaeger.trace_id, to_jaeger.span_id)
    assert to_jaeger.service == "name-from-code"
    assert stats["exported"] == 1 and stats["dropped"] == 0  # counts the collector's export only


def test_a_second_endpoint_that_is_down_costs_the_collector_nothing() -> None:
    """A flush (what an offset commit and the outbox relay wait for) waits for the collector's
    export only: the unreachable second endpoint's exporter retries for its 10 s timeout on its
    own thread."""
    dead = f"http://127.0.0.1:{free_port()}"
    with GrpcReceiver() as collector:
        stats = traced(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "HOPTRACE_EXPORT_ALSO": dead}
        )
        assert len(collector.received.named("one-span")) == 1
    assert stats["exported"] == 1 and stats["export_failed"] == 0
    assert stats["flushed"] is True and stats["flush_s"] < 2.0, stats
