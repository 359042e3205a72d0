"""LeanTracerProvider makes the spans the SDK's TracerProvider makes: the same spans started
through both (same ids, same times) give the same exported fields and the same OTLP bytes, for
plain and odd attribute values, limits, parents, samplers, links, events and errors."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.processor.baggage import BaggageSpanProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, Tracer, TracerProvider, _Span
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from hoptrace.instrumentation._accel import Speedup
from hoptrace.instrumentation._accel.lean_spans import (
    LeanAttributes,
    LeanSpan,
    LeanTracer,
    LeanTracerProvider,
)
from hoptrace.instrumentation._accel.otlp import sdk_encode_request
from hoptrace.instrumentation.tracing import get_tracer

from .helpers import accel_only, plain_process

T0 = 1_700_000_000_000_000_000


class CountingIds(IdGenerator):
    """Deterministic ids so both providers give the same spans the same ids."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def generate_span_id(self) -> int:
        return next(self._n)

    def generate_trace_id(self) -> int:
        return 0xABC0_0000 + next(self._n)


def _provider(
    cls: type[TracerProvider], ids: IdGenerator | None = None, **kw: Any
) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = cls(
        resource=Resource.create({"service.name": "lean-test"}),
        id_generator=ids or CountingIds(),
        **kw,
    )
    provider.add_span_processor(BaggageSpanProcessor(lambda key: key == "hoptrace.correlation_id"))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _fields(span: ReadableSpan) -> dict[str, Any]:
    """Everything an exporter reads from a finished span."""
    return {
        "name": span.name,
        "context": span.context,
        "flags": int(span.context.trace_flags),
        "trace_state": span.context.trace_state.to_header() if span.context.trace_state else "",
        "parent": span.parent,
        "kind": span.kind,
        "attributes": list((span.attributes or {}).items()),
        "dropped_attributes": span.dropped_attributes,
        "events": [(e.name, list((e.attributes or {}).items())) for e in span.events],
        "dropped_events": span.dropped_events,
        "links": [(lk.context, list((lk.attributes or {}).items())) for lk in span.links],
        "dropped_links": span.dropped_links,
        "status": (span.status.status_code, span.status.description),
        "start": span.start_time,
        "end": span.end_time,
        "resource": dict(span.resource.attributes),
        "scope": span.instrumentation_scope,
    }


REMOTE = SpanContext(
    0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v")])
)
REMOTE_UNSAMPLED = SpanContext(0x1234, 0x5679, is_remote=True, trace_flags=TraceFlags(0))
LONG = "x" * 300


def _scenario(tracer: trace.Tracer) -> None:
    """Spans started, changed and ended the ways the SDK's callers do."""
    remote = trace.set_span_in_context(NonRecordingSpan(REMOTE))
    with_baggage = baggage.set_baggage("hoptrace.correlation_id", "pay-1", remote)
    with_baggage = baggage.set_baggage("other", "never copied", with_baggage)
    plain = {"s": "v", "i": 3, "f": 1.5, "b": True, "i0": 0}
    odd = {"none": None, "bytes": b"\x00", "list": ["a", "b"], "tuple": (1, 2), "map": {"k": 1}}

    s = tracer.start_span("root", attributes=plain, start_time=T0)
    s.set_attribute("later", "x")
    s.set_attributes({"i": 4, "s2": "y"})  # "i" again: moves to the end, as in the SDK
    s.end(end_time=T0 + 1)

    s = tracer.start_span(
        "remote child",
        context=with_baggage,
        kind=SpanKind.CONSUMER,
        attributes={**plain, "long": LONG},
        start_time=T0,
    )
    s.set_attributes(odd)  # not plain: the SDK's cleaning
    s.set_attribute("", "empty key")
    s.set_attribute("obj", object())
    s.set_attribute("float_list", [1.0, 2.0])
    s.add_event("evt", {"a": 1}, timestamp=T0 + 1)
    s.record_exception(ValueError("boom"), timestamp=T0 + 2)
    s.set_status(Status(StatusCode.ERROR, "boom"))
    s.add_link(REMOTE_UNSAMPLED, {"added": "later"})
    s.update_name("renamed")
    s.end(end_time=T0 + 3)
    # after the end nothing changes what the processors got (the SDK hands them a copy)
    s.set_attribute("after end", 1)
    s.add_event("after end")
    s.add_link(REMOTE, {"after": "end"})
    s.set_status(Status(StatusCode.OK))
    s.update_name("after end")
    s.end(end_time=T0 + 9)  # a second end: a warning, no second export

    with tracer.start_as_current_span("local parent", start_time=T0, end_on_exit=False) as p:
        c = tracer.start_span("local child", attributes={"k": "v"}, start_time=T0)
        c.end(end_time=T0 + 1)
        linked = tracer.start_span(
            "linked", links=[Link(REMOTE, {"l": 1})], start_time=T0
        )  # links: the SDK's own path
        linked.end(end_time=T0 + 1)
        try:
            with tracer.start_as_current_span("raises", start_time=T0, end_on_exit=False) as r:
                raise RuntimeError("inside")
        except RuntimeError:
            r.end(end_time=T0 + 1)
    p.end(end_time=T0 + 5)

    unsampled = tracer.start_span(
        "unsampled",
        context=trace.set_span_in_context(NonRecordingSpan(REMOTE_UNSAMPLED)),
        start_time=T0,
    )
    unsampled.end(
        end_time=T0 + 1
    )  # not exported under the default sampler (its parent is unsampled)


def _run(cls: type[TracerProvider], scenario: Callable[[trace.Tracer], None], **kw: Any):
    provider, exporter = _provider(cls, **kw)
    scenario(provider.get_tracer("lean", "1.0", attributes={"scope": "attr"}))
    return exporter.get_finished_spans()


@pytest.mark.parametrize(
    "limits",
    [None, SpanLimits(max_span_attributes=6, max_span_attribute_length=100, max_events=1)],
    ids=["default limits", "tight limits"],
)
def test_same_spans_as_the_sdk(limits: SpanLimits | None) -> None:
    kw = {"span_limits": limits} if limits else {}
    sdk = _run(TracerProvider, _scenario, **kw)
    lean = _run(LeanTracerProvider, _scenario, **kw)
    assert len(lean) == len(sdk) == 6
    for got, want in zip(lean, sdk, strict=True):
        assert _fields(got) == _fields(want)
    # and the bytes an OTLP exporter sends (but for the exception event's own clock reading)
    timed = [s for s in lean if s.name != "raises"], [s for s in sdk if s.name != "raises"]
    assert sdk_encode_request(timed[0]) == sdk_encode_request(timed[1])
    # the correlation baggage was copied, the other key was not
    child = next(s for s in lean if s.name == "renamed")
    if limits is None:  # (6 attributes: the oldest, this one, were dropped as the SDK drops)
        assert child.attributes["hoptrace.correlation_id"] == "pay-1"
    else:
        assert child.dropped_attributes > 0
    assert "other" not in child.attributes
    assert "unsampled" not in [s.name for s in lean]


def test_same_spans_under_another_sampler() -> None:
    """Any sampler but the default takes the SDK's path: same decisions, same spans."""
    for sampler in (ALWAYS_ON, TraceIdRatioBased(0.5)):
        sdk = _run(TracerProvider, _scenario, sampler=sampler)
        lean = _run(LeanTracerProvider, _scenario, sampler=sampler)
        assert [_fields(s) for s in lean] == [_fields(s) for s in sdk]


def test_random_trace_id_flag_as_the_sdk() -> None:
    """Root spans from the random id generator carry the W3C random flag; children inherit."""

    def flags(cls: type[TracerProvider]) -> list[int]:
        provider, exporter = _provider(cls, ids=RandomIdGenerator())
        tracer = provider.get_tracer("lean")
        with tracer.start_as_current_span("root"):
            tracer.start_span("child").end()
        tracer.start_span("remote", context=trace.set_span_in_context(NonRecordingSpan(REMOTE)))
        tracer.start_span(
            "remote", context=trace.set_span_in_context(NonRecordingSpan(REMOTE))
        ).end()
        return [int(s.context.trace_flags) for s in exporter.get_finished_spans()]

    assert flags(LeanTracerProvider) == flags(TracerProvider) == [3, 3, 1]


def test_the_span_has_the_fields_the_sdk_constructor_sets() -> None:
    """An SDK upgrade that adds a span field fails here, not in production."""
    provider, _ = _provider(LeanTracerProvider)
    tracer = provider.get_tracer("lean")
    assert type(tracer) is LeanTracer
    assert provider.get_tracer("lean") is tracer  # the provider's cache is kept
    lean = tracer.start_span("x")
    sdk = Tracer.start_span(tracer, "x")  # the SDK's own path, same tracer
    assert type(sdk) is _Span
    assert type(lean) is LeanSpan and isinstance(lean, _Span)
    assert sorted(vars(lean)) == sorted(vars(sdk))
    assert type(lean._attributes) is LeanAttributes  # noqa: SLF001


def test_events_and_links_are_each_spans_own() -> None:
    """Spans start sharing one empty events/links list; the first event or link gives the span
    its own, so nothing one span records shows on another."""
    provider, exporter = _provider(LeanTracerProvider)
    tracer = provider.get_tracer("lean")
    a, b, c = (tracer.start_span(n) for n in "abc")
    a.add_event("only a")
    b.add_link(REMOTE, {"only": "b"})
    for s in (a, b, c):
        s.end()
    got = {s.name: s for s in exporter.get_finished_spans()}
    assert [e.name for e in got["a"].events] == ["only a"] and got["a"].links == ()
    assert got["b"].events == () and [lk.context for lk in got["b"].links] == [REMOTE]
    assert got["c"].events == () and got["c"].links == ()
    assert got["c"].dropped_events == got["c"].dropped_links == 0
    # events past the limit are dropped and counted on the span's own list, as in the SDK
    limited, _ = _provider(LeanTracerProvider, span_limits=SpanLimits(max_events=1, max_links=1))
    s = limited.get_tracer("lean").start_span("full")
    for i in range(3):
        s.add_event(f"e{i}")
        s.add_link(REMOTE)
    assert (s.dropped_events, s.dropped_links) == (2, 2)
    assert tracer.start_span("fresh").dropped_events == 0


def test_lean_attributes_match_bounded_attributes() -> None:
    """The attribute table alone, value by value, against the SDK's."""
    from opentelemetry.attributes import BoundedAttributes

    values: list[Any] = [
        "s",
        "",
        0,
        -1,
        2**70,
        1.5,
        float("nan"),
        True,
        None,
        b"b",
        ["a"],
        ("x", 1),
        {"m": [1]},
        object(),
        LONG,
    ]
    for maxlen, max_value_len in ((None, None), (3, 10), (0, None)):
        sdk = BoundedAttributes(maxlen, None, immutable=False, max_value_len=max_value_len)
        lean = LeanAttributes(maxlen, None, immutable=False, max_value_len=max_value_len)
        for i, v in enumerate(values):
            for table in (sdk, lean):
                table[f"k{i % 4}"] = v
                table._set_items({f"b{i % 3}": v, "plain": i})  # noqa: SLF001
        assert repr(list(lean.items())) == repr(list(sdk.items()))
        assert lean.dropped == sdk.dropped
    frozen = LeanAttributes(None, {"a": 1}, immutable=True)
    with pytest.raises(TypeError):
        frozen["b"] = 2


@accel_only(Speedup.LEAN_SPANS)
def test_configure_tracing_uses_the_lean_provider(spans: InMemorySpanExporter) -> None:
    """Every hoptrace process (workers, services, tests) gets its spans this way."""
    assert isinstance(trace.get_tracer_provider(), LeanTracerProvider)
    assert isinstance(get_tracer(), LeanTracer)


def test_without_the_speedup_configure_tracing_uses_the_sdk_provider() -> None:
    plain_process(
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import Tracer, TracerProvider\n"
        "assert type(trace.get_tracer_provider()) is TracerProvider, trace.get_tracer_provider()\n"
        "assert type(get_tracer()) is Tracer, get_tracer()"
    )
