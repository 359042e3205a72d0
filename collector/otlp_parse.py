"""OTLP trace request bodies -> ``ExportTraceServiceRequest``: protobuf, or OTLP/JSON (hex ids,
lowerCamelCase, int64 as strings, enums as integers). A body that is neither raises
:class:`DecodeFailure` with a message the receivers send back."""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class DecodeFailure(ValueError):
    """The body is not a decodable OTLP ExportTraceServiceRequest."""


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(body)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise DecodeFailure(f"invalid protobuf: {exc}") from None
    return req


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_b64(obj: dict[str, Any]) -> None:
    for key in _ID_KEYS:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise DecodeFailure(f"{key} {value[:40]!r} is not hex") from None


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP/JSON (hex ids, lowerCamelCase, int64 as strings, enums as integers)."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise DecodeFailure("invalid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeFailure(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeFailure("invalid OTLP/JSON: top level must be an object")
    try:
        for rs in doc.get("resourceSpans") or doc.get("resource_spans") or []:
            for ss in rs.get("scopeSpans") or rs.get("scope_spans") or []:
                for span in ss.get("spans") or []:
                    _hex_ids_to_b64(span)
                    for link in span.get("links") or []:
                        _hex_ids_to_b64(link)
        req = ExportTraceServiceRequest()
        json_format.ParseDict(doc, req, ignore_unknown_fields=True)
    except DecodeFailure:
        raise
    except (json_format.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise DecodeFailure(f"invalid OTLP/JSON: {exc}") from None
    except RecursionError:
        raise DecodeFailure("invalid OTLP/JSON: nested too deeply") from None
    return req
