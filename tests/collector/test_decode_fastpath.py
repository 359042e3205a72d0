"""The fast paths of ingest: the inlined attribute decoding equals the generic AnyValue mapping for
every value type, and a request the queue cannot take is refused before it is decoded."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from hoptrace.collector import ingest
from hoptrace.collector.decode import (
    COLUMNS,
    CORRELATION_ATTR,
    STEP_ATTR,
    _cid,
    _dumps,
    _text,
    attributes,
    decode_request,
)
from hoptrace.collector.spanqueue import SpanQueue

from .helpers import request, step_span

NOW = datetime(2026, 1, 1, tzinfo=UTC)
I_ATTRS, I_CID, I_STEP = COLUMNS.index("attributes"), 11, 13


def _value(kind: str, raw: object) -> AnyValue:
    if kind == "array":
        return AnyValue(array_value={"values": [AnyValue(string_value=str(raw))]})
    return AnyValue(**{kind: raw})  # type: ignore[arg-type]


values = st.one_of(
    st.tuples(st.just("string_value"), st.text(max_size=12)),
    st.tuples(st.just("string_value"), st.sampled_from(["", "\x00", "pay-1", "a b"])),
    st.tuples(st.just("int_value"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("bool_value"), st.booleans()),
    st.tuples(st.just("double_value"), st.floats(allow_nan=False, allow_infinity=False)),
    st.tuples(st.just("bytes_value"), st.binary(max_size=6)),
    st.tuples(st.just("array"), st.text(max_size=4)),
)
keys = st.sampled_from([CORRELATION_ATTR, STEP_ATTR, "k1", "k2", "messaging.kafka.offset"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(keys, values), max_size=8))
def test_inlined_attribute_decoding_matches_the_generic_mapping(attrs: list) -> None:
    _, span = step_span("x", 0)
    del span.attributes[:]
    for key, (kind, raw) in attrs:
        span.attributes.append(KeyValue(key=key, value=_value(kind, raw)))
    req = request([("svc", span)])
    (row,) = decode_request(req, NOW).rows
    expected = attributes(span.attributes)
    assert row[I_ATTRS] == _dumps(expected)
    assert row[I_CID] == (
        _cid(expected[CORRELATION_ATTR]) if CORRELATION_ATTR in expected else None
    )
    step = expected.get(STEP_ATTR)
    assert row[I_STEP] == (None if step is None else _text(str(step)))


def test_correlation_ids_validated_once_per_value_still_per_span() -> None:
    spans = [step_span("pay-ok", 0), step_span("bad id!", 1), step_span("pay-ok", 2)]
    rows = decode_request(request(spans), NOW).rows
    assert [r[I_CID] for r in rows] == ["pay-ok", None, "pay-ok"]


def test_a_full_queue_refuses_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = SpanQueue(max_spans=2)
    ing = ingest.Ingestor(queue, None)
    assert ing.submit(request([step_span("a", 0), step_span("a", 1)]), "http").accepted

    def boom(*_: object) -> None:
        raise AssertionError("decoded although the queue is full")

    monkeypatch.setattr(ingest, "decode_request", boom)
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=os.urandom(16), span_id=os.urandom(8), name="late"
    )
    out = ing.submit(req, "http")
    assert not out.accepted and out.error.startswith("queue full")
    assert queue.depth == 2
