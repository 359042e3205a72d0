"""OTLP trace requests (protobuf or OTLP/JSON) -> span rows for the store. Pure functions.

A span row is a tuple in :data:`COLUMNS` order (the COPY column list). Spans without a valid
trace id / span id are rejected (counted, reported as OTLP partial success), never stored.

:func:`decode_body` uses the native decoder (``hoptrace_native.decode_traces``: protobuf ->
PostgreSQL binary COPY tuples, :class:`Encoded`) when that extension is installed, else (and for
the rare request it leaves to Python) :func:`parse_protobuf` + :func:`decode_request`, the
reference semantics; ``tests/collector/test_native_decode.py`` proves both store the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from hoptrace.contract import PipelineSpec
from hoptrace.contract.conventions import (
    ATTR_CORRELATION_ID,
    ATTR_OUTCOME,
    ATTR_PIPELINE,
    ATTR_STEP,
    DESTINATION_KEYS,
    DISTRO_NAME,
    GROUP_KEYS,
    OPERATION_KEYS,
    RESOURCE_DISTRO_NAME,
    RESOURCE_SERVICE_NAME,
    STATUS_ERROR,
    UNKNOWN_SERVICE,
    SpanKind,
)
from hoptrace.contract.matching import StepMatcher
from hoptrace.ids import is_valid_correlation_id

from .otlp_parse import DecodeFailure, parse_json, parse_protobuf

__all__ = [
    "COLUMNS",
    "DEFAULT_KEYS",
    "DecodeFailure",
    "DecodeKeys",
    "Decoded",
    "Encoded",
    "Rows",
    "SpanRow",
    "body_span_count",
    "decode_body",
    "decode_request",
    "native_available",
    "parse_json",
    "parse_protobuf",
    "span_count",
    "us_to_dt",
]

try:  # the optional native decoder (Rust, native/src/decode.rs)
    import hoptrace_native as _native
except ImportError:  # pragma: no cover - exercised where the extension is not built
    _native = None

CORRELATION_ATTR = ATTR_CORRELATION_ID
PIPELINE_ATTR = ATTR_PIPELINE
STEP_ATTR = ATTR_STEP
OUTCOME_ATTR = ATTR_OUTCOME

#: Column order of a span row (and of the COPY into the staging table). Times are integer
#: microseconds since the Unix epoch (``*_us``); the insert turns them into timestamptz.
COLUMNS: tuple[str, ...] = (
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "service",
    "kind",
    "start_us",
    "end_us",
    "duration_us",
    "status_code",
    "status_message",
    "correlation_id",
    "pipeline",
    "step",
    "outcome",
    "attributes",
    "events",
    "received_us",
    "resource",
    "scope",
)
# Indexes into a row, for the state tracker.
I_TRACE, I_SPAN, I_START, I_END, I_STATUS, I_STATUS_MSG = 0, 1, 6, 7, 9, 10
I_CID, I_PIPELINE, I_STEP, I_OUTCOME, I_NAME = 11, 12, 13, 14, 3
#: Step rows of :class:`Encoded` carry this many leading columns (what the fold reads).
STEP_ROW_COLUMNS = 15
#: A candidate row (a span without a step attribute that may be a step run of a service
#: hoptrace did not write, or fail one): trace, span, parent, name, service, kind, start_us,
#: end_us, status_code, status_message, cid, destination, group, operation.
C_TRACE, C_SPAN, C_PARENT, C_NAME, C_SERVICE, C_KIND, C_START, C_END = 0, 1, 2, 3, 4, 5, 6, 7
C_STATUS, C_STATUS_MSG, C_CID, C_DESTINATION, C_GROUP, C_OPERATION = 8, 9, 10, 11, 12, 13
DAY_US = 86_400_000_000

SpanRow = tuple[Any, ...]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MESSAGING_KINDS = (SpanKind.PRODUCER.value, SpanKind.CONSUMER.value)
_ZERO_TRACE = b"\x00" * 16
_ZERO_SPAN = b"\x00" * 8


def _scrub(value: Any) -> Any:
    """``value`` with every NUL character (in strings and keys) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL: replaced (a NUL would fail the whole batch's COPY)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _small(value: int) -> int:
    """smallint columns (kind, status code): an enum value outside int16 is stored as 0
    (unspecified) instead of failing the whole batch's COPY."""
    return value if -32768 <= value <= 32767 else 0


def _cid(value: Any) -> str | None:
    """The correlation id column: a string (or integer) id in the correlation id format; an id
    that is not (too long, odd characters) stays in the attributes but is not indexed."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if is_valid_correlation_id(value) else None


def _dumps(value: Any) -> str:
    out = orjson.dumps(value, default=str).decode()
    if "\\u0000" in out:  # jsonb refuses \u0000: re-encode without NULs (rare path)
        out = orjson.dumps(_scrub(value), default=str).decode()
    return out


def us_to_dt(us: int) -> datetime:
    """Microseconds since the epoch -> aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True, slots=True)
class DecodeKeys:
    """The attribute names decoding reads, from the pipeline spec: where the correlation id is
    (the spec's carriers, in order) and, when ``candidates``, the messaging attributes of the
    spans step matching looks at (see :data:`C_TRACE`...)."""

    cid: tuple[str, ...] = (ATTR_CORRELATION_ID,)
    candidates: bool = False

    @classmethod
    def for_spec(cls, spec: PipelineSpec) -> DecodeKeys:
        return cls(cid=StepMatcher(spec).cid_keys, candidates=True)

    def native(self) -> Any:
        """The native decoder's ``Keys`` for these names."""
        assert _native is not None
        if not self.candidates:
            return _native.Keys(list(self.cid))
        return _native.Keys(
            list(self.cid),
            list(DESTINATION_KEYS),
            list(GROUP_KEYS),
            list(OPERATION_KEYS),
            (RESOURCE_DISTRO_NAME, DISTRO_NAME),
        )


DEFAULT_KEYS = DecodeKeys()


@dataclass(slots=True)
class Encoded:
    """Spans already encoded as PostgreSQL binary COPY tuples for ``spans`` (SPAN columns in
    :data:`COLUMNS` order, no header/trailer), from the native decoder."""

    copy: bytes
    n: int
    steps: list[SpanRow]  # rows of the spans with a step attribute, first STEP_ROW_COLUMNS
    days: list[int]  # distinct start days (start_us // DAY_US)
    candidates: list[SpanRow] = field(default_factory=list)  # see C_TRACE...


class Rows(list[SpanRow]):
    """Span rows of the Python path, with the candidate spans among them (:data:`C_TRACE`...)
    riding along to the writer."""

    __slots__ = ("candidates",)

    def __init__(self, rows: Any = ()) -> None:
        super().__init__(rows)
        self.candidates: list[SpanRow] = []


@dataclass(slots=True)
class Decoded:
    rows: Rows = field(default_factory=Rows)
    rejected: int = 0
    error: str = ""
    encoded: Encoded | None = None  # the native path's output (then ``rows`` is empty)

    @property
    def candidates(self) -> list[SpanRow]:
        return self.encoded.candidates if self.encoded is not None else self.rows.candidates

    @property
    def count(self) -> int:
        """Spans to store."""
        return self.encoded.n if self.encoded is not None else len(self.rows)


def any_value(v: Any) -> Any:
    """An OTLP AnyValue -> a JSON-able Python value."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return v.int_value
    if which == "bool_value":
        return v.bool_value
    if which == "double_value":
        return v.double_value
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return v.bytes_value.hex()
    return None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def _ts(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _first_text(attrs: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = attrs.get(key)
        if type(value) is str and value:
            return _text(value)
    return None


def decode_request(
    req: ExportTraceServiceRequest, received_at: datetime, keys: DecodeKeys = DEFAULT_KEYS
) -> Decoded:
    """Flatten a request into span rows (COLUMNS order); count the spans that cannot be stored.
    The correlation id column is the first of ``keys.cid`` holding a valid id; with
    ``keys.candidates``, the spans step matching looks at are listed in ``candidates``."""
    out = Decoded()
    rows = out.rows
    append = rows.append
    cid_keys = keys.cid
    single = cid_keys == DEFAULT_KEYS.cid
    candidates = rows.candidates if keys.candidates else None
    received_us = (received_at - _EPOCH) // timedelta(microseconds=1)
    dumps = _dumps
    cids: dict[str, str | None] = {}  # correlation id -> indexed value (validated once)
    rejected = 0
    for rs in req.resource_spans:
        res = attributes(rs.resource.attributes)
        service = res.get(RESOURCE_SERVICE_NAME)
        service = _text(service) if isinstance(service, str) and service else UNKNOWN_SERVICE
        res_json = dumps(res)
        own = res.get(RESOURCE_DISTRO_NAME) == DISTRO_NAME
        for ss in rs.scope_spans:
            scope = _text(ss.scope.name) if ss.scope.name else None
            for sp in ss.spans:
                tid = sp.trace_id
                sid = sp.span_id
                if len(tid) != 16 or len(sid) != 8 or tid == _ZERO_TRACE or sid == _ZERO_SPAN:
                    rejected += 1
                    continue
                attrs: dict[str, Any] = {}
                for kv in sp.attributes:
                    v = kv.value
                    sv = v.string_value
                    if sv:  # the common case: one access, no oneof lookup
                        attrs[kv.key] = sv
                        continue
                    w = v.WhichOneof("value")
                    if w == "int_value":
                        attrs[kv.key] = v.int_value
                    elif w == "string_value":
                        attrs[kv.key] = sv
                    else:
                        attrs[kv.key] = any_value(v)
                start_us = sp.start_time_unix_nano // 1000 or received_us
                end_us = sp.end_time_unix_nano // 1000 or start_us
                if end_us < start_us:
                    end_us = start_us
                if sp.events:
                    events = dumps(
                        [
                            {
                                "name": ev.name,
                                "time": _ts(ev.time_unix_nano).isoformat(),
                                "attributes": attributes(ev.attributes),
                            }
                            for ev in sp.events
                        ]
                    )
                else:
                    events = "[]"
                # an id that is not in the correlation id format is kept in the attributes but
                # not indexed: no lookup can ask for it
                if single:
                    cid = attrs.get(CORRELATION_ATTR)
                    if type(cid) is str:
                        if cid in cids:
                            cid = cids[cid]
                        else:
                            cid = cids[cid] = _cid(cid)
                    elif cid is not None:
                        cid = _cid(cid)
                else:  # the spec's carriers, in order: the first valid id wins
                    cid = None
                    for key in cid_keys:
                        value = attrs.get(key)
                        if value is not None:
                            cid = _cid(value)
                            if cid is not None:
                                break
                step = attrs.get(STEP_ATTR)
                pipeline = attrs.get(PIPELINE_ATTR)
                if pipeline is not None:
                    pipeline = _text(pipeline if type(pipeline) is str else str(pipeline))
                if step is not None:
                    outcome = attrs.get(OUTCOME_ATTR)
                    step = _text(step if type(step) is str else str(step))
                    if outcome is not None:
                        outcome = _text(outcome if type(outcome) is str else str(outcome))
                else:
                    outcome = None
                parent = sp.parent_span_id
                status = sp.status
                name = sp.name
                message = status.message
                trace_hex = tid.hex()
                span_hex = sid.hex()
                parent_hex = parent.hex() if len(parent) == 8 and parent != _ZERO_SPAN else None
                name = name.replace("\x00", "\ufffd") if "\x00" in name else name
                kind = _small(sp.kind)
                message = _text(message) if message else None
                if candidates is not None and step is None and not own:
                    destination = _first_text(attrs, DESTINATION_KEYS)
                    if (
                        kind in _MESSAGING_KINDS
                        or status.code == STATUS_ERROR
                        or destination is not None
                    ):
                        candidates.append(
                            (
                                trace_hex,
                                span_hex,
                                parent_hex,
                                name,
                                service,
                                kind,
                                start_us,
                                end_us,
                                _small(status.code),
                                message,
                                cid,
                                destination,
                                _first_text(attrs, GROUP_KEYS),
                                _first_text(attrs, OPERATION_KEYS),
                            )
                        )
                append(
                    (
                        trace_hex,
                        span_hex,
                        parent_hex,
                        name,
                        service,
                        kind,
                        start_us,
                        end_us,
                        end_us - start_us,
                        _small(status.code),
                        message,
                        cid,
                        pipeline,
                        step,
                        outcome,
                        dumps(attrs),
                        events,
                        received_us,
                        res_json,
                        scope,
                    )
                )
    if rejected:
        out.rejected = rejected
        out.error = _rejected_error(rejected)
    return out


def _rejected_error(rejected: int) -> str:
    return f"{rejected} span(s) rejected: missing or invalid trace_id/span_id"


def native_available() -> bool:
    return _native is not None


def body_span_count(body: bytes) -> int | None:
    """Spans in a protobuf request body without decoding them (native only; None when unknown:
    no native module, or not protobuf)."""
    if _native is None:
        return None
    try:
        return _native.count_spans(body)
    except ValueError:
        return None


def _received_us(received_at: datetime) -> int:
    return (received_at - _EPOCH) // timedelta(microseconds=1)


def decode_body(
    body: bytes,
    received_at: datetime,
    *,
    native: bool = True,
    keys: DecodeKeys = DEFAULT_KEYS,
) -> Decoded:
    """A protobuf ExportTraceServiceRequest body -> spans to store; DecodeFailure when it is not
    one. Native when available (and ``native``), else the Python path."""
    if native and _native is not None:
        try:
            out = _native.decode_with(body, _received_us(received_at), _native_keys(keys))
        except ValueError:
            out = None  # the reference parser decides: its error message, or a quirk it accepts
        if out is not None:
            copy, n, rejected, steps, days, candidates = out
            return Decoded(
                rejected=rejected,
                error=_rejected_error(rejected) if rejected else "",
                encoded=Encoded(copy, n, steps, days, candidates),
            )
    return decode_request(parse_protobuf(body), received_at, keys)


_NATIVE_KEYS: dict[DecodeKeys, Any] = {}


def _native_keys(keys: DecodeKeys) -> Any:
    native = _NATIVE_KEYS.get(keys)
    if native is None:
        native = _NATIVE_KEYS[keys] = keys.native()
    return native


def span_count(req: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
