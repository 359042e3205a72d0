"""OTLP/HTTP receiver (starlette): ``POST /v1/traces`` (protobuf or JSON, optional gzip),
``GET /healthz`` (liveness: the process answers), ``GET /readyz`` (readiness: the store answers,
the write queue is below its cap and the last span write succeeded; 503 with the reason
otherwise), ``GET /metrics``.

Answers per the OTLP spec: 200 (with ``partial_success`` when spans were rejected), 400
undecodable, 401 bad/missing token, 413 too large (Content-Length, streamed size and decompressed
size are all capped: a gzip bomb is refused without inflating it), 415 unsupported content type or
encoding, 503 + Retry-After when the write queue is full. Never 500 for bad input.

A gzip body may hold several members (RFC 1952; ``cat a.gz b.gz``): every member is inflated,
the cap applies to their sum, and bytes after a member that are no gzip member make it a 400.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Sequence

from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from . import metrics
from .ingest import Ingestor
from .otlp_parse import DecodeFailure, parse_json

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_PROTOBUF_TYPES = {"application/x-protobuf", "application/protobuf"}


_OK = ExportTraceServiceResponse().SerializeToString()
#: ``/healthz`` body of a healthy collector (bytes: the body as sent).
_HEALTHY = b"ok"
#: At most this many gzip members in one body (each costs a fresh inflater).
MAX_GZIP_MEMBERS = 1024

#: The readiness check: (ready, why).
ReadyFn = Callable[[], Awaitable[tuple[bool, str]]]


async def _always_ready() -> tuple[bool, str]:
    return True, "ready"


class TooLarge(Exception):
    pass


def _body(
    msg: object, json_out: bool, status: int, headers: dict[str, str] | None = None
) -> Response:
    if json_out:
        return Response(
            json_format.MessageToJson(msg, indent=None),
            status,
            headers,
            media_type=JSON,  # type: ignore[arg-type]
        )
    return Response(msg.SerializeToString(), status, headers, media_type=PROTOBUF)  # type: ignore[attr-defined]


def _error(
    status: int, message: str, json_out: bool, headers: dict[str, str] | None = None
) -> Response:
    return _body(Status(code=status, message=message), json_out, status, headers)


def gunzip_capped(data: bytes, cap: int) -> bytes:
    """Inflate gzip ``data``, every member of it; raise TooLarge past ``cap`` bytes in all
    (without inflating the rest), ``zlib.error`` for a truncated member, bytes after a member
    that are none, or more than :data:`MAX_GZIP_MEMBERS` members."""
    parts: list[bytes] = []
    total = 0
    rest = data
    for _ in range(MAX_GZIP_MEMBERS):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(rest, cap - total + 1)
        total += len(out)
        if total > cap or d.unconsumed_tail:
            raise TooLarge()
        if not d.eof:
            raise zlib.error("truncated gzip stream")
        parts.append(out)
        rest = d.unused_data
        if not rest:
            return b"".join(parts)
    raise zlib.error(f"more than {MAX_GZIP_MEMBERS} gzip members")


def build_app(
    ingestor: Ingestor,
    max_body_bytes: int,
    healthy: Callable[[], bool] = lambda: True,
    ready: ReadyFn = _always_ready,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The receiver's app; ``extra_routes`` are mounted beside its own (e.g. the redrive route
    the command line passes in: the collector itself only reads)."""

    async def traces(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        json_in = ctype == JSON
        if not ingestor.authorized(request.headers.get("authorization")):
            metrics.SPANS_DROPPED.labels("unauthenticated").inc()
            return _error(
                401, "missing or invalid bearer token", json_in, {"WWW-Authenticate": "Bearer"}
            )
        if ctype not in _PROTOBUF_TYPES and not json_in:
            return _error(
                415, f"unsupported content type {ctype!r}: use {PROTOBUF} or {JSON}", False
            )
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", ""):
            return _error(415, f"unsupported content encoding {encoding!r}", json_in)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            metrics.SPANS_DROPPED.labels("too_large").inc()
            return _error(413, f"body over {max_body_bytes} bytes", json_in)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                metrics.SPANS_DROPPED.labels("too_large").inc()
                return _error(413, f"body over {max_body_bytes} bytes", json_in)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if encoding == "gzip":
            try:
                raw = gunzip_capped(raw, max_body_bytes)
            except TooLarge:
                metrics.SPANS_DROPPED.labels("too_large").inc()
                return _error(413, f"decompressed body over {max_body_bytes} bytes", json_in)
            except zlib.error as exc:
                metrics.SPANS_DROPPED.labels("undecodable").inc()
                return _error(400, f"invalid gzip body: {exc}", json_in)
        try:
            if json_in:
                outcome = ingestor.submit(parse_json(raw), "http")
            else:
                outcome = ingestor.submit_body(raw, "http")
        except DecodeFailure as exc:
            metrics.SPANS_DROPPED.labels("undecodable").inc()
            return _error(400, str(exc), json_in)
        if not outcome.accepted:
            return _error(503, outcome.error, json_in, {"Retry-After": "1"})
        if not outcome.rejected and not json_in:  # the common answer, pre-encoded
            return Response(_OK, 200, media_type=PROTOBUF)
        resp = ExportTraceServiceResponse()
        if outcome.rejected:
            resp.partial_success.rejected_spans = outcome.rejected
            resp.partial_success.error_message = outcome.error
        return _body(resp, json_in, 200)

    async def healthz(_: Request) -> Response:
        ok = healthy()
        return PlainTextResponse(_HEALTHY if ok else b"unhealthy", 200 if ok else 503)

    async def readyz(_: Request) -> Response:
        ok, why = await ready()
        return PlainTextResponse(why, 200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        body, ctype = metrics.render()
        return Response(body, 200, media_type=ctype)

    return Starlette(
        routes=[
            Route("/v1/traces", traces, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *extra_routes,
        ]
    )
