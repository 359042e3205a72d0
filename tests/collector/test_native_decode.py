"""The native decoder (``hoptrace_native.decode_traces``, Rust) against the Python reference
(``parse_protobuf`` + ``decode_request``): the same requests give the same rows, field for field
(JSON compared with float tokens kept as text), and the same stored rows and correlation state in
PostgreSQL, including the duplicate (staging) path. Imports the extension directly: a broken
build fails here instead of silently taking the Python path."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import hoptrace_native
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from hoptrace.collector import ingest, schema
from hoptrace.collector.decode import (
    COLUMNS,
    CORRELATION_ATTR,
    DEFAULT_KEYS,
    OUTCOME_ATTR,
    PIPELINE_ATTR,
    STEP_ATTR,
    STEP_ROW_COLUMNS,
    Decoded,
    DecodeFailure,
    DecodeKeys,
    Encoded,
    decode_body,
    decode_request,
    parse_protobuf,
)
from hoptrace.collector.spanqueue import SpanQueue
from hoptrace.collector.writer import Writer, init_connection
from hoptrace.contract import load_spec
from hoptrace.contract.conventions import (
    DESTINATION_KEYS,
    DISTRO_NAME,
    GROUP_KEYS,
    MESSAGE_KEY_KEYS,
    OPERATION_KEYS,
    RESOURCE_DISTRO_NAME,
)
from hoptrace.ids import is_valid_correlation_id

from .helpers import STEPS, kv, request, step_span

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NOW_US = (NOW - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
PG_EPOCH_US = 946_684_800_000_000
TEXT, INT2, INT8, TS, JSONB = "text", "int2", "int8", "ts", "jsonb"
TYPES = {
    "kind": INT2, "status_code": INT2, "start_us": TS, "end_us": TS, "received_us": TS,
    "duration_us": INT8, "attributes": JSONB, "events": JSONB, "resource": JSONB,
}  # fmt: skip


# ------------------------------------------------------------------ helpers


def parse_copy(buf: bytes, n: int) -> list[tuple[Any, ...]]:
    """Binary COPY tuples -> rows in the Python row shape (times as Unix microseconds)."""
    rows, p = [], 0
    for _ in range(n):
        (nf,) = struct.unpack_from(">h", buf, p)
        p += 2
        assert nf == len(COLUMNS)
        row: list[Any] = []
        for col in COLUMNS:
            (ln,) = struct.unpack_from(">i", buf, p)
            p += 4
            if ln < 0:
                row.append(None)
                continue
            raw = buf[p : p + ln]
            p += ln
            kind = TYPES.get(col, TEXT)
            if kind == TEXT:
                row.append(raw.decode())
            elif kind == INT2:
                assert ln == 2
                row.append(struct.unpack(">h", raw)[0])
            elif kind == INT8:
                row.append(struct.unpack(">q", raw)[0])
            elif kind == TS:
                row.append(struct.unpack(">q", raw)[0] + PG_EPOCH_US)
            else:
                assert raw[0] == 1, "jsonb version byte"
                row.append(raw[1:].decode())
        rows.append(tuple(row))
    assert p == len(buf), "trailing bytes"
    return rows


def comparable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """JSON columns parsed (duplicate keys: last wins, as in jsonb), float tokens kept as text
    so ``1e+16`` and ``1e16`` stay different."""
    return tuple(
        json.loads(v, parse_float=str, parse_constant=str) if TYPES.get(c) == JSONB else v
        for c, v in zip(COLUMNS, row, strict=True)
    )


def native(body: bytes, keys: DecodeKeys | None = None) -> Decoded | None:
    if keys is None:
        out = hoptrace_native.decode_traces(body, NOW_US)
        if out is None:
            return None
        copy, n, rejected, steps, days = out
        return Decoded(rejected=rejected, encoded=Encoded(copy, n, steps, days))
    out = hoptrace_native.decode_with(body, NOW_US, keys.native())
    if out is None:
        return None
    copy, n, rejected, steps, days, candidates = out
    return Decoded(rejected=rejected, encoded=Encoded(copy, n, steps, days, candidates))


#: A spec whose carriers are a named attribute and the message key after the baggage attribute,
#: and whose decoding lists the spans step matching looks at.
SPEC_KEYS = DecodeKeys(cid=(CORRELATION_ATTR, "app.payment_id", *MESSAGE_KEY_KEYS), candidates=True)


def assert_same(req: ExportTraceServiceRequest, keys: DecodeKeys | None = None) -> Decoded | None:
    """Both decoders on ``req``'s bytes agree; returns the native result (None: left to
    Python)."""
    body = req.SerializeToString()
    ref = decode_request(parse_protobuf(body), NOW, keys or DEFAULT_KEYS)
    nat = native(body, keys)
    if nat is None:
        return None
    enc = nat.encoded
    assert enc is not None
    assert nat.rejected == ref.rejected
    assert enc.n == len(ref.rows)
    got = parse_copy(enc.copy, enc.n)
    assert [comparable(r) for r in got] == [comparable(r) for r in ref.rows]
    steps = [r[:STEP_ROW_COLUMNS] for r in ref.rows if r[13] is not None]
    assert enc.steps == steps
    assert sorted(enc.days) == sorted({r[6] // 86_400_000_000 for r in ref.rows})
    assert enc.candidates == ref.candidates
    return nat


def span(attrs: list[KeyValue], **kw: Any) -> Span:
    base: dict[str, Any] = {
        "trace_id": os.urandom(16),
        "span_id": os.urandom(8),
        "name": "s",
        "start_time_unix_nano": 1_767_268_800_000_000_000,
        "end_time_unix_nano": 1_767_268_800_005_000_000,
    }
    base.update(kw)
    return Span(attributes=attrs, **base)


def one(sp: Span, resource: list[KeyValue] | None = None, scope: str = "sc") -> Any:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(resource if resource is not None else [kv("service.name", "x")])
    ss = rs.scope_spans.add()
    ss.scope.name = scope
    ss.spans.append(sp)
    return req


def av(**kw: Any) -> AnyValue:
    return AnyValue(**kw)


# ------------------------------------------------------------------ hand-made nasty cases


def test_every_value_type_and_nested_values() -> None:
    attrs = [
        KeyValue(key="s", value=av(string_value="a\x00b")),
        KeyValue(key="e", value=av(string_value="")),
        KeyValue(key="i", value=av(int_value=-(2**63))),
        KeyValue(key="I", value=av(int_value=2**63 - 1)),
        KeyValue(key="b", value=av(bool_value=True)),
        *[
            KeyValue(key=f"d{i}", value=av(double_value=d))
            for i, d in enumerate(
                [
                    0.1,
                    1e16,
                    1e15,
                    1e-5,
                    1e-7,
                    -0.0,
                    5e-324,
                    1.7976931348623157e308,
                    float("nan"),
                    float("inf"),
                    123456789012345680.0,
                    2.5e-5,
                ]
            )  # fmt: skip
        ],
        KeyValue(key="y", value=av(bytes_value=b"\x00\xffab")),
        KeyValue(key="n", value=AnyValue()),
        KeyValue(key="x", value=av(string_value_strindex=3)),
        KeyValue(key="novalue"),
        KeyValue(
            key="a",
            value=av(
                array_value=ArrayValue(
                    values=[
                        av(int_value=1),
                        av(string_value="\x00"),
                        AnyValue(),
                        av(array_value=ArrayValue(values=[av(bool_value=False)])),
                    ]
                )  # fmt: skip
            ),
        ),
        KeyValue(
            key="k",
            value=av(
                kvlist_value=KeyValueList(
                    values=[
                        KeyValue(key="z\x00", value=av(double_value=2.0)),
                        KeyValue(key="z\ufffd", value=av(int_value=3)),
                        KeyValue(key="z\x00", value=av(int_value=4)),
                    ]
                )  # fmt: skip
            ),
        ),
        KeyValue(key="dup", value=av(int_value=1)),
        KeyValue(key="dup", value=av(string_value="last")),
        KeyValue(key="q\x00", value=av(int_value=1)),
        KeyValue(key="q\ufffd", value=av(int_value=2)),
        KeyValue(key="q\x00", value=av(int_value=3)),
    ]
    events = [
        Span.Event(time_unix_nano=1_767_268_800_123_456_789, name="ev\x00", attributes=attrs[:3]),
        Span.Event(time_unix_nano=0, name=""),
        Span.Event(time_unix_nano=2**64 - 1, name="max"),
        Span.Event(time_unix_nano=951_782_400_000_000_000, name="leap day"),
    ]
    sp = span(attrs, events=events, name="n\x00", status=Status(code=2, message="m\x00"))
    assert assert_same(one(sp, scope="sc\x00")) is not None


def test_ids_times_kind_status_and_resource_rules() -> None:
    spans = [
        span([], trace_id=b"\x00" * 16),  # rejected: zero trace id
        span([], span_id=b"\x00" * 8),  # rejected: zero span id
        span([], trace_id=os.urandom(17)),  # rejected: length
        span([], span_id=b""),  # rejected: missing
        span([], parent_span_id=b"\x00" * 8),  # zero parent -> NULL
        span([], parent_span_id=os.urandom(7)),  # bad parent -> NULL
        span([], parent_span_id=os.urandom(8)),
        span([], start_time_unix_nano=999, end_time_unix_nano=0),  # start -> received
        span([], start_time_unix_nano=5_000_000, end_time_unix_nano=1_000),  # end < start
        span([], start_time_unix_nano=2**64 - 1, end_time_unix_nano=2**64 - 1),
        span([], kind=70_000, status=Status(code=-40_000)),  # out of smallint: 0
        span([], kind=-5, status=Status(code=32_767)),
    ]
    for resource in (
        [],
        [kv("service.name", "")],
        [kv("service.name", 7)],
        [KeyValue(key="service.name", value=av(bytes_value=b"\x01"))],
        [kv("service.name", "a"), kv("service.name", "b\x00")],
        [kv("service.name", "a"), KeyValue(key="service.name")],
    ):
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.extend(resource)
        rs.scope_spans.add().spans.extend(spans)
        rs.scope_spans.add(scope={"name": ""}).spans.extend(spans[4:6])
        nat = assert_same(req)
        assert nat is not None and nat.rejected == 4


@pytest.mark.parametrize(
    ("attrs", "indexed"),
    [
        ([kv(CORRELATION_ATTR, "pay-1")], "pay-1"),
        ([kv(CORRELATION_ATTR, "bad id!")], None),
        ([kv(CORRELATION_ATTR, "-x")], None),
        ([kv(CORRELATION_ATTR, "a" * 128)], "a" * 128),
        ([kv(CORRELATION_ATTR, "a" * 129)], None),
        ([kv(CORRELATION_ATTR, "é1")], None),
        ([kv(CORRELATION_ATTR, 12345)], "12345"),
        ([kv(CORRELATION_ATTR, -1)], None),
        ([kv(CORRELATION_ATTR, True)], None),
        ([KeyValue(key=CORRELATION_ATTR, value=av(bytes_value=b"\xab"))], "ab"),
        ([KeyValue(key=CORRELATION_ATTR, value=av(double_value=1.0))], None),
        ([kv(CORRELATION_ATTR, "good"), KeyValue(key=CORRELATION_ATTR)], None),
        ([kv(CORRELATION_ATTR, "x y"), kv(CORRELATION_ATTR, "ok")], "ok"),
    ],
)
def test_correlation_id_indexing(attrs: list[KeyValue], indexed: str | None) -> None:
    nat = assert_same(one(span(attrs)))
    assert nat is not None and nat.encoded is not None
    assert parse_copy(nat.encoded.copy, 1)[0][11] == indexed


@pytest.mark.parametrize(
    "value",
    [
        av(string_value="payment.confirmed"),
        av(string_value=""),
        av(string_value="s\x00"),
        av(int_value=3),
        av(bool_value=False),
        av(bytes_value=b"\x01\x02"),
        AnyValue(),
    ],
)
def test_step_pipeline_outcome_renderings(value: AnyValue) -> None:
    for key in (STEP_ATTR, PIPELINE_ATTR, OUTCOME_ATTR):
        attrs = [kv(CORRELATION_ATTR, "c1"), kv(STEP_ATTR, "payment.confirmed")]
        attrs.append(KeyValue(key=key, value=value))
        assert assert_same(one(span(attrs))) is not None


@pytest.mark.parametrize(
    "value",
    [
        av(double_value=1.5),
        av(array_value=ArrayValue(values=[av(int_value=1)])),
        av(kvlist_value=KeyValueList(values=[])),
    ],
)
def test_python_only_renderings_fall_back_to_python(value: AnyValue) -> None:
    """str() of a double/array/kvlist step is Python's: the native decoder hands it back."""
    req = one(span([kv(STEP_ATTR, "x"), KeyValue(key=PIPELINE_ATTR, value=value)]))
    assert hoptrace_native.decode_traces(req.SerializeToString(), NOW_US) is None
    out = decode_body(req.SerializeToString(), NOW)
    assert out.encoded is None
    assert out.rows == decode_request(req, NOW).rows


def _field(num: int, wire: int, payload: bytes) -> bytes:
    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            b, v = v & 0x7F, v >> 7
            out.append(b | (0x80 if v else 0))
            if not v:
                return bytes(out)

    key = varint(num << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def _wrap(span_bytes: bytes) -> bytes:
    return _field(1, 2, _field(2, 2, _field(2, 2, span_bytes)))


def test_malformed_protobuf_is_a_value_error_and_a_decode_failure() -> None:
    ids = _field(1, 2, os.urandom(16)) + _field(2, 2, os.urandom(8))
    bodies = [
        b"\xff\xff\xff",
        b"\x0a\x05ab",  # truncated
        _wrap(ids + _field(5, 2, b"\xff\xfe")),  # name: invalid UTF-8
        _wrap(ids + _field(3, 2, b"\xc3")),  # trace_state (not stored): invalid UTF-8 too
        _field(1, 2, _field(3, 2, b"\xff")),  # resource schema_url
    ]
    for body in bodies:
        with pytest.raises(ValueError, match="invalid protobuf"):
            hoptrace_native.decode_traces(body, NOW_US)
        with pytest.raises(DecodeFailure) as py_exc:
            parse_protobuf(body)
        with pytest.raises(DecodeFailure) as exc:
            decode_body(body, NOW)
        assert str(exc.value) == str(py_exc.value)


def test_a_wire_type_upb_tolerates_is_decided_by_the_python_parser() -> None:
    """kind sent length-delimited: upb keeps it as an unknown field, prost refuses; the body
    then goes to the reference path, so the outcome is Python's."""
    ids = _field(1, 2, os.urandom(16)) + _field(2, 2, os.urandom(8))
    body = _wrap(ids + _field(5, 2, b"odd") + _field(6, 2, b"x"))
    out = decode_body(body, NOW)
    assert out.encoded is None
    assert out.rows == decode_request(parse_protobuf(body), NOW).rows and len(out.rows) == 1


def test_python_path_when_native_is_off() -> None:
    req = request([step_span("c-1", 0)])
    out = decode_body(req.SerializeToString(), NOW, native=False)
    assert out.encoded is None and out.rows == decode_request(req, NOW).rows


# ------------------------------------------------------------------ generated requests

texts = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=8),
    st.sampled_from(
        ["", "\x00", "a\x00", "pay-1", "x y", "payments", *STEPS, "ok", "error", DISTRO_NAME]
    ),
)
keys = st.one_of(
    st.sampled_from(
        [
            CORRELATION_ATTR,
            STEP_ATTR,
            PIPELINE_ATTR,
            OUTCOME_ATTR,
            "service.name",
            "app.payment_id",
            RESOURCE_DISTRO_NAME,
            *DESTINATION_KEYS,
            *GROUP_KEYS,
            *OPERATION_KEYS,
            *MESSAGE_KEY_KEYS,
            "k",
            "k\x00",
            "k\ufffd",
        ]  # fmt: skip
    ),
    texts,
)
scalars = st.one_of(
    texts.map(lambda s: av(string_value=s)),
    st.booleans().map(lambda b: av(bool_value=b)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: av(int_value=i)),
    st.floats().map(lambda d: av(double_value=d)),
    st.binary(max_size=4).map(lambda b: av(bytes_value=b)),
    st.just(AnyValue()),
    st.integers(0, 9).map(lambda i: av(string_value_strindex=i)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda vs: av(array_value=ArrayValue(values=vs))),
        st.lists(st.tuples(keys, inner), max_size=3).map(
            lambda kvs: av(
                kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in kvs])
            )
        ),
    ),
    max_leaves=5,
)
kvs = st.lists(st.tuples(keys, values), max_size=6).map(
    lambda pairs: [KeyValue(key=k, value=v) for k, v in pairs]
)
step_kvs = st.tuples(
    st.sampled_from(["c1", "c2", "bad id", "", "c\x00"]),
    st.sampled_from(STEPS),
    st.sampled_from(["ok", "duplicate", "error", "weird", ""]),
    st.sampled_from(["payments", "other"]),
).map(
    lambda t: [
        kv(CORRELATION_ATTR, t[0]),
        kv(STEP_ATTR, t[1]),
        kv(OUTCOME_ATTR, t[2]),
        kv(PIPELINE_ATTR, t[3]),
    ]  # fmt: skip
)
times = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, 999),
    st.integers(1_767_268_000_000_000_000, 1_767_269_000_000_000_000),
)
ids16 = st.one_of(
    st.integers(1, 2**128 - 1).map(lambda i: i.to_bytes(16, "big")), st.binary(max_size=17)
)
ids8 = st.one_of(
    st.integers(1, 2**64 - 1).map(lambda i: i.to_bytes(8, "big")), st.binary(max_size=9)
)
spans = st.builds(
    lambda tid, sid, parent, name, kind, t0, t1, attrs, extra, evs, code, msg: Span(
        trace_id=tid,
        span_id=sid,
        parent_span_id=parent,
        name=name,
        kind=kind,
        start_time_unix_nano=t0,
        end_time_unix_nano=t1,
        attributes=extra + attrs,
        events=[Span.Event(time_unix_nano=t, name=n, attributes=a) for t, n, a in evs],
        status=Status(code=code, message=msg),
    ),  # fmt: skip
    ids16,
    ids8,
    ids8,
    texts,
    st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1)),
    times,
    times,
    kvs,
    st.one_of(st.just([]), step_kvs),
    st.lists(st.tuples(times, texts, kvs), max_size=2),
    st.one_of(st.integers(0, 2), st.integers(-(2**31), 2**31 - 1)),
    texts,
)
requests = st.lists(
    st.tuples(kvs, st.lists(st.tuples(texts, st.lists(spans, max_size=3)), max_size=2)),
    max_size=3,
).map(
    lambda rss: ExportTraceServiceRequest(
        resource_spans=[
            {
                "resource": {"attributes": res},
                "scope_spans": [{"scope": {"name": sc}, "spans": sps} for sc, sps in scopes],
            }
            for res, scopes in rss
        ]
    )
)


@settings(max_examples=400, deadline=None)
@given(requests)
def test_generated_requests_decode_identically(req: ExportTraceServiceRequest) -> None:
    nat = assert_same(req)
    if nat is None:  # left to Python: only for a double/array/kvlist step/pipeline/outcome
        out = decode_body(req.SerializeToString(), NOW)
        assert out.rows == decode_request(req, NOW).rows


@settings(max_examples=400, deadline=None)
@given(requests)
def test_generated_requests_decode_identically_with_a_spec_s_keys(
    req: ExportTraceServiceRequest,
) -> None:
    """With a spec's carriers (first valid id wins) and the candidate spans listed."""
    nat = assert_same(req, SPEC_KEYS)
    if nat is None:
        out = decode_body(req.SerializeToString(), NOW, keys=SPEC_KEYS)
        ref = decode_request(req, NOW, SPEC_KEYS)
        assert out.rows == ref.rows and out.candidates == ref.candidates


def test_candidates_and_carriers() -> None:
    """Consumer/producer spans, spans naming a destination and failed spans are listed (not
    those of a service that reports its own steps); the first carrier holding a valid id wins."""
    consumer = span(
        [kv("messaging.destination", "t1"), kv("messaging.kafka.consumer.group", "g")], kind=5
    )
    keyed = span([kv("app.payment_id", "bad id"), kv(MESSAGE_KEY_KEYS[1], "pay-9")], kind=4)
    failed = span([kv("db.statement", "INSERT")], kind=3, status=Status(code=2, message="x"))
    plain = span([kv("http.method", "GET")], kind=2)
    req = one(consumer)
    req.resource_spans[0].scope_spans[0].spans.extend([keyed, failed, plain])
    nat = assert_same(req, SPEC_KEYS)
    assert nat is not None and nat.encoded is not None
    cands = nat.encoded.candidates
    assert [(c[5], c[10], c[11], c[12]) for c in cands] == [
        (5, None, "t1", "g"),
        (4, "pay-9", None, None),
        (3, None, None, None),
    ]
    own = one(consumer, resource=[kv(RESOURCE_DISTRO_NAME, DISTRO_NAME)])
    assert assert_same(own, SPEC_KEYS).encoded.candidates == []  # type: ignore[union-attr]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=130), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,130}")))
def test_correlation_id_rule_matches_hoptrace_ids(value: str) -> None:
    assert hoptrace_native.is_valid_correlation_id(value) == is_valid_correlation_id(value)


# ------------------------------------------------------------------ stored rows

_SPANS = """SELECT trace_id, span_id, parent_span_id, name, service, kind, start_time, end_time,
    duration_us, status_code, status_message, correlation_id, pipeline, step, outcome,
    attributes::text, events::text, received_at, resource::text, scope
FROM spans ORDER BY trace_id, span_id, start_time"""
_PARKED = """SELECT trace_id, span_id, step, start_us, end_us, run_failed, run_error, run_outcome
    FROM pending_steps ORDER BY trace_id, span_id"""
_CORR = """SELECT correlation_id, pipeline, state, last_step, last_step_index, last_step_at,
    failed_step, failed_at, error, next_step, next_deadline, first_seen, completed_at,
    steps::text, done_mask FROM correlations ORDER BY correlation_id"""


async def _store_both(db_url: str, spec_path: Path, reqs: list[ExportTraceServiceRequest]) -> None:
    """Each request twice (the second write takes the duplicate path) through both paths into
    an emptied store; the stored spans, correlations and parked runs must be the same."""
    spec = load_spec(spec_path)
    conn = await asyncpg.connect(db_url)
    await schema.migrate(conn, timedelta(days=7))
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2, init=init_connection)
    try:
        results = []
        for use_native in (False, True):
            # every table the writer keeps state in: runs parked by an earlier example (same
            # database) would otherwise be there for the first path only (it unparks them)
            await conn.execute("TRUNCATE spans, correlations, pending_steps")
            writer = Writer(pool, spec, timedelta(days=7))
            counts = []
            for req in reqs:
                out = decode_body(req.SerializeToString(), NOW, native=use_native)
                if not use_native:
                    assert out.encoded is None
                batch = out.encoded if out.encoded is not None else out.rows
                counts.append(await writer.write_spans([batch]))
                counts.append(await writer.write_spans([batch, batch]))  # all duplicates
            results.append(
                (
                    counts,
                    [tuple(r) for r in await conn.fetch(_SPANS)],
                    [tuple(r) for r in await conn.fetch(_CORR)],
                    [tuple(r) for r in await conn.fetch(_PARKED)],
                )  # fmt: skip
            )
        assert results[0] == results[1]
        assert results[0][1], "something stored"
    finally:
        await pool.close()
        await conn.close()


async def test_stored_rows_and_state_identical(db_url: str, spec_path: Path) -> None:
    now_ns = int(NOW.timestamp() * 1e9)
    reqs = [
        request([step_span(f"c{i}", s, start_ns=now_ns + s * 10**9) for s in range(4)])
        for i in range(3)
    ]
    reqs.append(request([step_span("c9", 1, outcome="error", error="boom\x00")]))
    reqs.append(one(span([kv(CORRELATION_ATTR, "c9"), kv("n\x00", "v\x00")], name="x\x00")))
    await _store_both(db_url, spec_path, reqs)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(requests, min_size=1, max_size=2))
def test_generated_requests_store_identically(
    db_url: str, spec_path: Path, reqs: list[ExportTraceServiceRequest]
) -> None:
    # at least one storable span, so the comparison is not vacuous
    valid = one(span([kv(CORRELATION_ATTR, "c1"), kv(STEP_ATTR, STEPS[0])], name=STEPS[0]))
    asyncio.run(_store_both(db_url, spec_path, [*reqs, valid]))


def test_count_spans_without_decoding_them() -> None:
    req = request([step_span("a", 0), step_span("a", 1)])
    req.resource_spans.add().scope_spans.add()  # an empty scope
    assert hoptrace_native.count_spans(req.SerializeToString()) == 2
    assert hoptrace_native.count_spans(b"") == 0
    with pytest.raises(ValueError, match="invalid protobuf"):
        hoptrace_native.count_spans(b"\xff\xff\xff")


def test_a_full_queue_refuses_a_body_before_decoding_it(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = SpanQueue(max_spans=2)
    ing = ingest.Ingestor(queue, None)
    body = request([step_span("a", 0), step_span("a", 1)]).SerializeToString()
    first = ing.submit_body(body, "http")
    assert first.accepted and first.stored == 2 and queue.depth == 2

    def boom(*_: object) -> None:
        raise AssertionError("decoded although the queue is full")

    monkeypatch.setattr(ingest, "decode_body", boom)
    out = ing.submit_body(request([step_span("b", 0)]).SerializeToString(), "http")
    assert not out.accepted and out.error.startswith("queue full")
    assert queue.depth == 2
