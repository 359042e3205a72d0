"""Differential test of the native OTLP span encoder: for the same finished spans,
``hoptrace_native.encode_spans`` must give the message the SDK's ``encode_spans`` builds
(compared parsed, and byte for byte). Imports hoptrace_native directly: a broken native build
fails here instead of silently falling back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import hoptrace_native
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from hoptrace.instrumentation._accel import otlp


def assert_same(spans: Sequence[ReadableSpan]) -> bytes:
    """Native bytes parse to exactly the SDK's message (and are the same bytes)."""
    native = hoptrace_native.encode_spans(spans)
    sdk = encode_spans(spans)
    parsed = ExportTraceServiceRequest.FromString(native)
    if not _has_nan(sdk):
        assert parsed == sdk
    assert parsed.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)
    assert native == sdk.SerializeToString()
    return native


def _has_nan(msg: ExportTraceServiceRequest) -> bool:
    return "nan" in str(msg).lower()


def _provider(
    resource: dict[str, Any] | None = None, limits: SpanLimits | None = None
) -> tuple[TracerProvider, InMemorySpanExporter]:
    mem = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create(resource or {"service.name": "native-test"}),
        span_limits=limits,
    )
    provider.add_span_processor(SimpleSpanProcessor(mem))
    return provider, mem


REMOTE = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "x1"), ("other", "y=2")]),
)


def test_a_realistic_batch_is_identical() -> None:
    provider, mem = _provider({"service.name": "w", "deployment.environment": "test", "n": 3})
    tracer = provider.get_tracer("hoptrace.instrumentation", "1.2.3")
    other = provider.get_tracer(
        "opentelemetry.instrumentation.asyncpg",
        "0.66b1",
        schema_url="https://opentelemetry.io/schemas/1.11.0",
        attributes={"scope.attr": "v", "n": 1},
    )
    from opentelemetry import trace

    parent_ctx = trace.set_span_in_context(trace.NonRecordingSpan(REMOTE))
    for i in range(20):
        with tracer.start_as_current_span(
            "purchase.created",
            context=parent_ctx,
            kind=SpanKind.CONSUMER,
            attributes={"hoptrace.correlation_id": f"pay-{i}", "messaging.kafka.offset": i},
            links=[Link(REMOTE, {"link.attr": True})],
        ) as span:
            with other.start_as_current_span("INSERT", kind=SpanKind.CLIENT) as db:
                db.set_attribute("db.statement", "INSERT INTO t VALUES ($1)")
            span.add_event("retry", {"attempt": 2, "delay": 0.5})
            if i % 3 == 0:
                try:
                    raise ValueError(f"boom {i} ✗")
                except ValueError as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
            elif i % 3 == 1:
                span.set_status(Status(StatusCode.OK))
    spans = mem.get_finished_spans()
    assert len(spans) == 40
    body = assert_same(spans)
    parsed = ExportTraceServiceRequest.FromString(body)
    assert len(parsed.resource_spans) == 1
    assert len(parsed.resource_spans[0].scope_spans) == 2  # grouped by scope
    scopes = {ss.scope.name: ss for ss in parsed.resource_spans[0].scope_spans}
    assert scopes["opentelemetry.instrumentation.asyncpg"].scope.attributes[0].key == "scope.attr"
    assert len(scopes["hoptrace.instrumentation"].spans) == 20


def test_groups_by_resource_and_scope_in_first_seen_order() -> None:
    pa, ma = _provider({"service.name": "a"})
    pb, mb = _provider({"service.name": "b"})
    pc, mc = _provider({"service.name": "a"})  # equal to a's resource, another object
    spans: list[ReadableSpan] = []
    for p, m, scope in ((pa, ma, "s1"), (pb, mb, "s1"), (pa, ma, "s2"), (pc, mc, "s1")):
        with p.get_tracer(scope).start_as_current_span(f"{scope}-span"):
            pass
        spans.extend(m.get_finished_spans())
        m.clear()
    spans.append(spans[0])
    body = assert_same(spans)
    parsed = ExportTraceServiceRequest.FromString(body)
    assert [len(rs.scope_spans) for rs in parsed.resource_spans] == [2, 1]


def test_dropped_counts_and_limits() -> None:
    limits = SpanLimits(max_span_attributes=3, max_events=2, max_links=1, max_attribute_length=5)
    provider, mem = _provider(limits=limits)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span(
        "limited", links=[Link(REMOTE), Link(REMOTE, {"a": 1})]
    ) as span:
        for i in range(6):
            span.set_attribute(f"k{i}", "a long value")
        for i in range(4):
            span.add_event(f"e{i}", {f"x{j}": j for j in range(6)})
    (done,) = mem.get_finished_spans()
    assert done.dropped_attributes == 3 and done.dropped_events == 2 and done.dropped_links == 1
    assert_same([done])


def test_empty_batch_and_unfinished_and_unnamed() -> None:
    assert hoptrace_native.encode_spans([]) == b""
    assert_same([])
    span = ReadableSpan(name="", context=REMOTE, parent=None, attributes=None)
    assert_same([span])


def test_every_value_type_sdk_accepts_outside_span_limits() -> None:
    """ReadableSpans built directly (no attribute cleaning): bytes, mappings, nesting, None,
    sequences of mixed types, huge ints (skipped by both), unsupported types (skipped)."""
    ctx = SpanContext(trace_id=1, span_id=2, is_remote=False)
    attrs: dict[str, Any] = {
        "none": None,
        "bytes": b"\x00\xff",
        "empty_bytes": b"",
        "map": {"a": 1, 2: "two", "nested": {"x": [1, "y", None]}},
        "proxy": MappingProxyType({"k": "v"}),
        "mixed": [1, "a", 2.5, True, None, b"z", (1, 2)],
        "range": range(3),
        "bytearray": bytearray(b"ab"),
        "too_big": 2**63,
        "too_small": -(2**63) - 1,
        "min": -(2**63),
        "max": 2**63 - 1,
        "nested_too_big": [1, 2**64],
        "object": object(),
        "surrogate": "\ud800",
        "inf": math.inf,
        "neg_zero": -0.0,
        "": "empty key",
        "unicode ключ ✓": "значение 🎉",
        "empty": "",
        "false": False,
        "zero": 0,
        "zero_f": 0.0,
        "empty_list": [],
        "empty_map": {},
    }
    span = ReadableSpan(
        name="values",
        context=ctx,
        parent=SpanContext(trace_id=1, span_id=0xFFFFFFFFFFFFFFFF, is_remote=False),
        attributes=attrs,
        events=(Event("e", {"nan": math.nan, "b": b"1"}, timestamp=5),),
        links=(Link(ctx, {"l": [1.5]}),),
        kind=SpanKind.PRODUCER,
        status=Status(StatusCode.ERROR, ""),
        start_time=1,
        end_time=2**64 - 1,
        resource=Resource({"r": ("a", "b")}, schema_url="https://example.com/s"),
        instrumentation_scope=InstrumentationScope("x", None, None, {"sa": 1}),
    )
    assert_same([span])


# -- hypothesis: generated attribute values, events, links, statuses ------------------------

_text = st.text(max_size=20)
_int = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_float = st.floats(allow_nan=True)
_scalar = st.one_of(_text, st.booleans(), _int, _float)
_homogeneous = st.one_of(
    st.lists(_text, max_size=5),
    st.lists(st.booleans(), max_size=5),
    st.lists(_int, max_size=5),
    st.lists(st.floats(allow_nan=False), max_size=5),
    st.lists(st.one_of(st.none(), _text), max_size=5),
)
_attr_value = st.one_of(_scalar, _homogeneous)
_attrs = st.dictionaries(_text, _attr_value, max_size=8)
_any = st.recursive(
    st.one_of(st.none(), _scalar, st.binary(max_size=8), st.integers()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(_text, st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)
_ids = st.integers(min_value=1, max_value=2**64 - 1)


@st.composite
def _span_specs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "name": draw(_text),
        "kind": draw(st.sampled_from(list(SpanKind))),
        "attrs": draw(_attrs),
        "events": draw(st.lists(st.tuples(_text, _attrs), max_size=3)),
        "links": draw(st.lists(st.tuples(_ids, st.booleans(), _attrs), max_size=2)),
        "status": draw(st.sampled_from(list(StatusCode))),
        "description": draw(st.one_of(st.none(), _text)),
        "remote_parent": draw(st.booleans()),
        "trace_state": draw(
            st.lists(
                st.tuples(
                    st.from_regex(r"[a-z][a-z0-9_\-*/]{0,10}", fullmatch=True),
                    st.from_regex(r"[a-zA-Z0-9]{1,10}", fullmatch=True),
                ),
                max_size=3,
                unique_by=lambda kv: kv[0],
            )
        ),
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_span_specs(), min_size=1, max_size=6))
def test_generated_sdk_spans(specs: list[dict[str, Any]]) -> None:
    from opentelemetry import trace

    provider, mem = _provider()
    tracer = provider.get_tracer("gen", "0.1")
    for spec in specs:
        parent = SpanContext(
            trace_id=REMOTE.trace_id,
            span_id=REMOTE.span_id,
            is_remote=spec["remote_parent"],
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
            trace_state=TraceState(spec["trace_state"]),
        )
        links = [
            Link(SpanContext(trace_id=i, span_id=i, is_remote=remote), attrs)
            for i, remote, attrs in spec["links"]
        ]
        with tracer.start_as_current_span(
            spec["name"],
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
            kind=spec["kind"],
            attributes=spec["attrs"],
            links=links,
        ) as span:
            for name, attrs in spec["events"]:
                span.add_event(name, attrs)
            span.set_status(Status(spec["status"], spec["description"]))
    assert_same(mem.get_finished_spans())


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_text, _any, max_size=6), st.dictionaries(_text, _any, max_size=3))
def test_generated_raw_values(attrs: dict[str, Any], event_attrs: dict[str, Any]) -> None:
    """Any value shape a ReadableSpan may hold (uncleaned): nested lists/tuples/maps, bytes,
    out-of-range integers (the SDK skips that key; so must we)."""
    span = ReadableSpan(
        name="raw",
        context=SpanContext(trace_id=7, span_id=9, is_remote=False),
        attributes=attrs,
        events=(Event("ev", event_attrs, timestamp=11),),
        status=Status(StatusCode.UNSET),
        start_time=3,
        end_time=4,
    )
    assert_same([span])


def test_malformed_span_raises_value_error() -> None:
    class NotASpan:
        pass

    with pytest.raises(ValueError):
        hoptrace_native.encode_spans([NotASpan()])
    with pytest.raises(ValueError):
        hoptrace_native.encode_spans(
            [ReadableSpan(name="\ud800", context=SpanContext(1, 2, False))]
        )


def test_the_tracing_module_uses_the_native_encoder() -> None:
    """otlp.encode_request is the native encoder when hoptrace_native is installed, and the
    SDK fallback gives the same bytes."""
    provider, mem = _provider()
    with provider.get_tracer("t").start_as_current_span("x", attributes={"a": [1, 2]}):
        pass
    spans = mem.get_finished_spans()
    assert otlp.native_encoder_available()
    assert otlp.encode_request(spans) == otlp.sdk_encode_request(spans)


def _realistic_spans(n: int = 10) -> Sequence[ReadableSpan]:
    provider, mem = _provider({"service.name": "export-test"})
    tracer = provider.get_tracer("hoptrace.instrumentation", "1.0")
    for i in range(n):
        with tracer.start_as_current_span(
            f"step-{i}", kind=SpanKind.CONSUMER, attributes={"hoptrace.correlation_id": f"c{i}"}
        ) as span:
            span.add_event("e", {"i": i})
            span.set_status(Status(StatusCode.ERROR, "bad ✗"))
    return mem.get_finished_spans()


@pytest.mark.parametrize("native", [True, False], ids=["native", "sdk-fallback"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_exporters_deliver_to_a_receiver(protocol: str, native: bool, monkeypatch) -> None:
    """The exporters tracing builds send the encoded bytes (gRPC: raw request through the
    identity serializer; HTTP: posted body); without hoptrace_native they use the SDK's."""
    from .otlp_receiver import GrpcReceiver, HttpReceiver

    if not native:
        monkeypatch.setattr(otlp, "_native", None)
    spans = _realistic_spans()
    with (GrpcReceiver if protocol == "grpc" else HttpReceiver)() as receiver:
        if protocol == "grpc":
            exporter = otlp.grpc_exporter(endpoint=receiver.endpoint, insecure=True, timeout=5)
        else:
            exporter = otlp.http_exporter(endpoint=receiver.endpoint + "/v1/traces", timeout=5)
        try:
            assert type(exporter).__name__.startswith("Native")
            from opentelemetry.sdk.trace.export import SpanExportResult

            assert exporter.export(spans) is SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
        got = sorted(receiver.received.spans, key=lambda s: s.name)
    assert [s.name for s in got] == sorted(s.name for s in spans)
    assert all(s.status_code == 2 and s.service == "export-test" for s in got)
    assert got[3].attributes == {"hoptrace.correlation_id": "c3"}


def test_grpc_exporter_to_an_unreachable_collector_fails_cleanly() -> None:
    """No receiver: a FAILURE result within the timeout, never an exception."""
    import socket
    import time

    from opentelemetry.sdk.trace.export import SpanExportResult

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    exporter = otlp.grpc_exporter(endpoint=f"http://127.0.0.1:{port}", insecure=True, timeout=1)
    try:
        t0 = time.monotonic()
        assert exporter.export(_realistic_spans(3)) is SpanExportResult.FAILURE
        assert time.monotonic() - t0 < 5
    finally:
        exporter.shutdown()
