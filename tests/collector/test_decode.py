"""decode.py is pure: property tests that bad input only ever raises DecodeFailure, and that valid
spans round-trip."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from hoptrace.collector.decode import COLUMNS, decode_request
from hoptrace.collector.otlp_parse import DecodeFailure, parse_json, parse_protobuf

from .helpers import request, step_span

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(body: bytes) -> None:
    for parse in (parse_protobuf, parse_json):
        try:
            req = parse(body)
        except DecodeFailure:
            continue
        decoded = decode_request(req, NOW)  # whatever parsed must flatten without error
        assert all(len(r) == len(COLUMNS) for r in decoded.rows)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_random_json_never_crashes(doc: object) -> None:
    for wrapped in (
        doc,
        {"resourceSpans": doc},
        {"resourceSpans": [{"scopeSpans": [{"spans": [doc]}]}]},
    ):
        try:
            decode_request(parse_json(json.dumps(wrapped).encode()), NOW)
        except DecodeFailure:
            pass


def test_protobuf_roundtrip_and_rejections() -> None:
    svc, span = step_span("rt-1", 1, start_ns=1_764_200_000_123_456_789, duration_ms=7)
    _, bad = step_span("rt-2", 0)
    bad.span_id = b""
    _, zero = step_span("rt-3", 0, trace_id=b"\0" * 16)
    decoded = decode_request(
        parse_protobuf(request([(svc, span), ("x", bad), ("x", zero)]).SerializeToString()), NOW
    )
    assert decoded.rejected == 2 and "rejected" in decoded.error
    (row,) = decoded.rows
    r = dict(zip(COLUMNS, row, strict=True))
    assert r["trace_id"] == span.trace_id.hex() and r["span_id"] == span.span_id.hex()
    assert r["service"] == "purchase-worker" and r["correlation_id"] == "rt-1"
    assert r["step"] == "purchase.created" and r["outcome"] == "ok" and r["pipeline"] == "payments"
    assert r["start_us"] == 1_764_200_000_123_456 and r["duration_us"] == 7000
    assert json.loads(r["attributes"])["hoptrace.correlation_id"] == "rt-1"
    assert json.loads(r["resource"]) == {"service.name": "purchase-worker"}


def test_json_ids_must_be_hex() -> None:
    doc = {
        "resourceSpans": [
            {"scopeSpans": [{"spans": [{"traceId": "zz" * 16, "spanId": os.urandom(8).hex()}]}]}
        ]
    }
    try:
        parse_json(json.dumps(doc).encode())
    except DecodeFailure as exc:
        assert "traceId" in str(exc)
    else:
        raise AssertionError("non-hex trace id accepted")
