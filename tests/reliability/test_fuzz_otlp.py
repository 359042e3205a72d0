"""OTLP fuzzing: property tests on the decoders (only DecodeFailure, never another exception) and
a bounded network run against a real ``hoptrace collector`` process (0 crashes, 0 hangs, 0 answers
of 500, bounded memory, a good span still stored afterwards)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from benchmarks import otlp_fuzz as net
from hoptrace.collector.decode import (
    COLUMNS,
    DecodeFailure,
    decode_request,
    parse_json,
    parse_protobuf,
)

NOW = datetime.now(UTC)
_SEED_BODIES = [net.valid_request(random.Random(i)) for i in range(4)] + [
    net.odd_request(random.Random(i)) for i in range(4)
]


def decode_any(body: bytes, as_json: bool) -> None:
    """Decode like the receivers do; only DecodeFailure may escape. Rows must be storable."""
    try:
        req = parse_json(body) if as_json else parse_protobuf(body)
    except DecodeFailure:
        return
    out = decode_request(req, NOW)
    for row in out.rows:
        assert len(row) == len(COLUMNS)
        for value in row:
            if isinstance(value, str):  # PostgreSQL text and jsonb cannot hold NUL
                assert "\x00" not in value and "\\u0000" not in value, value[:80]


fuzz_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@fuzz_settings
@given(st.binary(max_size=2048))
def test_protobuf_decoder_on_arbitrary_bytes(body: bytes) -> None:
    decode_any(body, as_json=False)


@fuzz_settings
@given(st.sampled_from(_SEED_BODIES), st.randoms(use_true_random=False))
def test_protobuf_decoder_on_mutated_requests(body: bytes, rng: random.Random) -> None:
    decode_any(net.mutate(rng, body), as_json=False)


@fuzz_settings
@given(st.binary(max_size=2048))
def test_json_decoder_on_arbitrary_bytes(body: bytes) -> None:
    decode_any(body, as_json=True)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "00", "zz", "0102030405060708", "\x00", "1" * 32]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "resourceSpans",
                    "scopeSpans",
                    "spans",
                    "traceId",
                    "spanId",
                    "parentSpanId",
                    "attributes",
                    "key",
                    "value",
                    "stringValue",
                    "arrayValue",
                    "kvlistValue",
                    "values",
                    "links",
                    "events",
                    "name",
                    "status",
                    "kind",
                    "startTimeUnixNano",
                    "resource",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=40,
)


@fuzz_settings
@given(json_values)
def test_json_decoder_on_odd_documents(doc: object) -> None:
    decode_any(json.dumps(doc).encode(), as_json=True)


@fuzz_settings
@given(st.randoms(use_true_random=False))
def test_json_decoder_on_mutated_requests(rng: random.Random) -> None:
    decode_any(net.mutate_json(rng, net.json_request(rng)), as_json=True)
    decode_any(net.mutate(rng, net.json_request(rng)), as_json=True)


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_a_decode_failure(depth: int) -> None:
    """Regression: json.loads raised RecursionError, which the HTTP receiver answered with 500."""
    for body in (b"[" * depth, b'{"a":' * depth, b'{"resourceSpans":' + b"[" * depth):
        with pytest.raises(DecodeFailure, match="nested too deeply|invalid"):
            parse_json(body)


def test_nul_characters_are_replaced_before_the_store() -> None:
    """Regression: a NUL in a span name/attribute failed the COPY of the whole batch, which the
    writer retried forever (one wedged writer per such request)."""
    doc = json.loads(net.json_request(random.Random(1)))
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span["name"] = "a\x00b"
    span["attributes"].append({"key": "k\x00", "value": {"stringValue": "v\x00"}})
    out = decode_request(parse_json(json.dumps(doc).encode()), NOW)
    row = out.rows[0]
    assert row[COLUMNS.index("name")] == "a\ufffdb"
    assert json.loads(row[COLUMNS.index("attributes")])["k\ufffd"] == "v\ufffd"


@pytest.mark.parametrize(
    "cid, indexed",
    [("pay-1", True), ("x'; DROP TABLE spans; --", False), ("c" * 5000, False), ("a\n", False)],
)
def test_invalid_correlation_ids_are_kept_but_not_indexed(cid: str, indexed: bool) -> None:
    """Decision: a span whose hoptrace.correlation_id is not in the id format is stored with the
    attribute intact, but its correlation_id column is NULL (never indexed or tracked). A 5000-
    character id used to exceed the btree row limit and fail the batch forever."""
    doc = json.loads(net.json_request(random.Random(2)))
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span["attributes"][0]["value"]["stringValue"] = cid
    row = decode_request(parse_json(json.dumps(doc).encode()), NOW).rows[0]
    assert row[COLUMNS.index("correlation_id")] == (cid if indexed else None)
    assert json.loads(row[COLUMNS.index("attributes")])["hoptrace.correlation_id"] == cid


# ------------------------------------------------------------------ against a running collector


@pytest.fixture
def collector_proc(db_url: str, spec_path: Path, tmp_path: Path) -> net.CollectorProc:
    col = net.CollectorProc(db_url, spec_path, tmp_path)
    col.start()
    yield col
    rc = col.stop()
    assert rc == 0, f"collector exit {rc}: {col.tail()}"


async def test_network_fuzz_no_crash_hang_or_500(collector_proc: net.CollectorProc) -> None:
    rep = await net.run(collector_proc, http_cases=300, grpc_cases=120, memory_cases=24)
    figures = rep.as_json()
    print(json.dumps(figures, indent=1))
    assert not rep.crashed, collector_proc.tail()
    assert rep.hangs == [], rep.hangs
    assert rep.server_errors == [], rep.server_errors
    assert rep.valid_refused == [], rep.valid_refused
    assert rep.healthy_after
    assert rep.canary_stored, "a good span sent after the fuzz run was not stored"
    assert figures["by_kind"]["gzip-bomb"] == {"413": figures["by_kind"]["gzip-bomb"]["413"]}
    # multi-member gzip: decoded whole (every member's spans stored) or refused, never cut
    by_kind = figures["by_kind"]
    assert set(by_kind["gzip-multi-member"]) == {"200"}, by_kind["gzip-multi-member"]
    assert rep.multi_member_sent and rep.multi_member_missing == [], figures
    assert set(by_kind["gzip-multi-member-bomb"]) == {"413"}, by_kind["gzip-multi-member-bomb"]
    assert set(by_kind["gzip-member-then-junk"]) == {"400"}, by_kind["gzip-member-then-junk"]
    assert rep.rss_after_kb - rep.rss_before_kb < 100 * 1024, figures


async def test_poison_spans_do_not_wedge_the_writers(collector_proc: net.CollectorProc) -> None:
    """Regression: spans with NUL characters or a 5000-character correlation id were accepted
    (200) and then failed every write attempt forever; later good spans were never stored."""
    rng = random.Random(7)
    refused = 0
    async with net.httpx.AsyncClient(timeout=10) as client:
        for _ in range(6):
            resp = await client.post(
                f"{collector_proc.http}/v1/traces",
                content=net.odd_request(rng),
                headers={"content-type": "application/x-protobuf"},
            )
            assert resp.status_code == 200, resp.text
            partial = ExportTraceServiceResponse.FromString(resp.content).partial_success
            if partial.rejected_spans:  # dated 1970 or 2554: outside the store's time window
                assert "start time" in partial.error_message, partial.error_message
                refused += partial.rejected_spans
    assert await net.canary_stored(collector_proc, "after-poison")
    conn = await asyncpg.connect(collector_proc.db_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM spans WHERE service <> 'fuzz-service'")
        invalid_indexed = await conn.fetchval(
            "SELECT count(*) FROM spans WHERE correlation_id IN ($1, $2)",
            "x'; DROP TABLE spans; --",
            "c" * 5000,
        )
    finally:
        await conn.close()
    # every odd span landed (sanitised) or was refused as too far from now, and said so
    assert stored + refused == 6
    assert invalid_indexed == 0
