"""Every span an interop service exported, in full: the instrumentation tests' OTLP/HTTP receiver
(``tests/instrumentation/otlp_receiver.py``) with each request also decoded here into plain
dicts (name, kind, ids, attributes, resource, scope, status, events, links), so a test can assert
on any of it and write it to ``tests/artifacts`` for the report."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from ..instrumentation.otlp_receiver import GrpcReceiver, HttpReceiver


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def _attrs(kvs: list[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


_KINDS = {v: k.removeprefix("SPAN_KIND_") for k, v in trace_pb2.Span.SpanKind.items()}
_STATUS = {v: k.removeprefix("STATUS_CODE_") for k, v in trace_pb2.Status.StatusCode.items()}


@dataclass(frozen=True)
class Span:
    """One exported span, decoded."""

    name: str
    kind: str  # INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    scope_version: str
    status: str  # UNSET, OK, ERROR
    status_message: str
    events: list[dict[str, Any]]
    links: list[dict[str, Any]]
    start_ns: int
    end_ns: int

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "attributes": self.attributes,
            "status": {"code": self.status, "message": self.status_message},
            "events": self.events,
            "links": self.links,
            "scope": {"name": self.scope, "version": self.scope_version},
            "resource": self.resource,
            "duration_ms": round((self.end_ns - self.start_ns) / 1e6, 3),
        }


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    Span(
                        name=s.name,
                        kind=_KINDS.get(s.kind, str(s.kind)),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        attributes=_attrs(s.attributes),
                        resource=resource,
                        scope=ss.scope.name,
                        scope_version=ss.scope.version,
                        status=_STATUS.get(s.status.code, str(s.status.code)),
                        status_message=s.status.message,
                        events=[
                            {"name": e.name, "attributes": _attrs(e.attributes)} for e in s.events
                        ],
                        links=[
                            {
                                "trace_id": link.trace_id.hex(),
                                "span_id": link.span_id.hex(),
                                "attributes": _attrs(link.attributes),
                            }
                            for link in s.links
                        ],
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                    )
                )
    return out


#: OTEL_EXPORTER_OTLP_PROTOCOL value -> the instrumentation tests' receiver for it
RECEIVERS = {"grpc": GrpcReceiver, "http/protobuf": HttpReceiver}


class SpanSink:
    """An OTLP receiver (gRPC or HTTP/protobuf) on a free port that keeps every span in full
    (``spans()``).

    The HTTP receiver reads a body by its Content-Length only: a chunked request (what
    OpenTelemetry JS's OTLP/HTTP exporter sends) reaches it empty, so the Node.js worker is
    tested over gRPC."""

    def __init__(self, protocol: str = "http/protobuf") -> None:
        self.protocol = protocol
        self.receiver: GrpcReceiver | HttpReceiver = RECEIVERS[protocol]()
        self.endpoint = self.receiver.endpoint
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        received = self.receiver.received
        keep_summary = received.add

        def add(request: trace_service_pb2.ExportTraceServiceRequest) -> None:
            spans = decode(request)
            with self._lock:
                self._spans.extend(spans)
            keep_summary(request)

        received.add = add  # type: ignore[method-assign]  # the handler calls received.add

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def children(self, parent: Span) -> list[Span]:
        """The spans whose parent is ``parent``, in start order."""
        kids = [s for s in self.spans() if s.parent_span_id == parent.span_id]
        return sorted(kids, key=lambda s: s.start_ns)

    def write(self, path: Path, **context: Any) -> Path:
        """All spans (in export order) with the run's context, as JSON for the report."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            **context,
            "otlp_protocol": self.protocol,
            "spans": [s.as_dict() for s in self.spans()],
        }
        path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
        return path

    def __enter__(self) -> SpanSink:
        self.receiver.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.__exit__(*exc)
