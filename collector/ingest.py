"""Receive-side logic shared by the OTLP receivers: token check, decode, enqueue, metrics."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from . import metrics
from .decode import (
    DEFAULT_KEYS,
    Decoded,
    DecodeKeys,
    body_span_count,
    decode_body,
    decode_request,
    native_available,
    span_count,
)
from .spanqueue import SpanQueue


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: bool  # False: queue full, the sender must retry (nothing was enqueued)
    stored: int = 0  # spans enqueued
    rejected: int = 0  # spans refused for good (partial success)
    error: str = ""


class Ingestor:
    def __init__(
        self, queue: SpanQueue, token: str | None, keys: DecodeKeys = DEFAULT_KEYS
    ) -> None:
        self.queue = queue
        self.token = token or None
        self.keys = keys  # the pipeline's correlation carriers, candidates for step matching

    def authorized(self, authorization: str | None) -> bool:
        """``Authorization: Bearer <token>`` check (always true when no token is configured)."""
        if self.token is None:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        )

    def submit(self, req: ExportTraceServiceRequest, transport: str) -> Outcome:
        """A parsed request (OTLP/JSON bodies): decoded natively (re-serialized) when available."""
        refused = self._refuse_if_full(span_count(req), transport)
        if refused is not None:
            return refused
        now = datetime.now(UTC)
        if native_available():
            return self._enqueue(
                decode_body(req.SerializeToString(), now, keys=self.keys), transport
            )
        return self._enqueue(decode_request(req, now, self.keys), transport)

    def submit_body(self, body: bytes, transport: str) -> Outcome:
        """A protobuf request body (raises DecodeFailure when it is not one)."""
        refused = self._refuse_if_full(body_span_count(body), transport)
        if refused is not None:
            return refused
        return self._enqueue(decode_body(body, datetime.now(UTC), keys=self.keys), transport)

    def _refuse_if_full(self, n: int, transport: str) -> Outcome | None:
        """Refuse ``n`` spans before decoding them when the queue cannot take them (the sender
        retries them anyway); None when they fit."""
        if not n or self.queue.fits(n):
            return None
        metrics.SPANS_RECEIVED.labels(transport).inc(n)
        metrics.SPANS_DROPPED.labels("queue_full").inc(n)
        return Outcome(False, 0, 0, "queue full: retry later")

    def _enqueue(self, decoded: Decoded, transport: str) -> Outcome:
        count = decoded.count
        metrics.SPANS_RECEIVED.labels(transport).inc(count + decoded.rejected)
        if decoded.rejected:
            metrics.SPANS_DROPPED.labels("invalid").inc(decoded.rejected)
        if count:
            spans = decoded.encoded if decoded.encoded is not None else decoded.rows
            if not self.queue.offer(spans):
                metrics.SPANS_DROPPED.labels("queue_full").inc(count)
                return Outcome(False, 0, decoded.rejected, "queue full: retry later")
        metrics.QUEUE_DEPTH.set(self.queue.depth)
        return Outcome(True, count, decoded.rejected, decoded.error)

    def refuse(self, req_spans: int, reason: str) -> None:
        metrics.SPANS_DROPPED.labels(reason).inc(req_spans)


__all__ = ["Ingestor", "Outcome", "span_count"]
