"""Receive-side logic shared by the OTLP receivers: token check, decode, the time window, enqueue,
metrics.

The time window: a span whose start lies further ahead of the collector's clock than
``max_ahead`` or further back than ``max_age`` (the retention) is refused (OTLP partial success
says how many and why) instead of stored. The store has no partition for such a day: the span
would sit in the default partition, which retention by partition never drops, and would keep
that day's partition from being created. The Kafka span source applies the same window.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from . import metrics
from .decode import (
    C_START,
    DAY_US,
    DEFAULT_KEYS,
    I_START,
    Decoded,
    DecodeKeys,
    Rows,
    body_span_count,
    decode_body,
    decode_request,
    native_available,
    parse_protobuf,
    span_count,
)
from .spanqueue import SpanQueue

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
#: How far ahead of the collector's clock a span may start (SDK clocks drift; a day is plenty).
MAX_AHEAD = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: bool  # False: queue full, the sender must retry (nothing was enqueued)
    stored: int = 0  # spans enqueued
    rejected: int = 0  # spans refused for good (partial success)
    error: str = ""


@dataclass(frozen=True, slots=True)
class SpanWindow:
    """Start times the store takes: from ``now - max_age`` to ``now + max_ahead`` (None: no
    bound on that side)."""

    max_age: timedelta | None = None
    max_ahead: timedelta | None = MAX_AHEAD

    def apply(
        self,
        decoded: Decoded,
        request: Callable[[], ExportTraceServiceRequest],
        now: datetime,
        keys: DecodeKeys = DEFAULT_KEYS,
    ) -> tuple[Decoded, int]:
        """``decoded`` without the spans outside the window, and how many those were (added to
        its ``rejected`` with the reason). ``request`` re-parses the request: natively encoded
        spans are re-decoded in Python only when one of their days is at or past an edge."""
        if self.max_age is None and self.max_ahead is None:
            return decoded, 0
        now_us = (now - _EPOCH) // _US
        lo = now_us - self.max_age // _US if self.max_age is not None else None
        hi = now_us + self.max_ahead // _US if self.max_ahead is not None else None
        enc = decoded.encoded
        if enc is not None:
            lo_day = lo // DAY_US if lo is not None else None
            hi_day = hi // DAY_US if hi is not None else None
            if all(
                (lo_day is None or d > lo_day) and (hi_day is None or d < hi_day) for d in enc.days
            ):
                return decoded, 0  # every day strictly inside: the common case, nothing to do
            decoded = decode_request(request(), now, keys)
        rows = decoded.rows

        def inside(start: int) -> bool:
            return (lo is None or start >= lo) and (hi is None or start <= hi)

        keep = Rows(r for r in rows if inside(r[I_START]))
        out = len(rows) - len(keep)
        if not out:
            return decoded, 0
        keep.candidates = [c for c in rows.candidates if inside(c[C_START])]
        why = f"{out} span(s) rejected: start time {self._describe()}"
        error = f"{decoded.error}; {why}" if decoded.error else why
        return Decoded(rows=keep, rejected=decoded.rejected + out, error=error), out

    def _describe(self) -> str:
        parts = []
        if self.max_ahead is not None:
            parts.append(f"more than {_human(self.max_ahead)} ahead of the collector's clock")
        if self.max_age is not None:
            parts.append(f"older than the retention ({_human(self.max_age)})")
        return " or ".join(parts)


def _human(d: timedelta) -> str:
    s = int(d.total_seconds())
    if s % 86400 == 0:
        return f"{s // 86400}d"
    if s % 3600 == 0:
        return f"{s // 3600}h"
    return f"{s}s"


class Ingestor:
    def __init__(
        self,
        queue: SpanQueue,
        token: str | None,
        window: SpanWindow | None = None,
        keys: DecodeKeys = DEFAULT_KEYS,
    ) -> None:
        self.queue = queue
        self.token = token or None
        self.window = window or SpanWindow(max_age=None, max_ahead=None)
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
            decoded = decode_body(req.SerializeToString(), now, keys=self.keys)
        else:
            decoded = decode_request(req, now, self.keys)
        return self._enqueue(*self.window.apply(decoded, lambda: req, now, self.keys), transport)

    def submit_body(self, body: bytes, transport: str) -> Outcome:
        """A protobuf request body (raises DecodeFailure when it is not one)."""
        refused = self._refuse_if_full(body_span_count(body), transport)
        if refused is not None:
            return refused
        now = datetime.now(UTC)
        decoded = decode_body(body, now, keys=self.keys)
        return self._enqueue(
            *self.window.apply(decoded, lambda: parse_protobuf(body), now, self.keys), transport
        )

    def _refuse_if_full(self, n: int | None, transport: str) -> Outcome | None:
        """Refuse ``n`` spans before decoding them when the queue cannot take them (the sender
        retries them anyway); None when they fit."""
        if not n or self.queue.fits(n):
            return None
        metrics.SPANS_REFUSED.labels(transport).inc(n)
        return Outcome(False, 0, 0, "queue full: retry later")

    def _enqueue(self, decoded: Decoded, out_of_window: int, transport: str) -> Outcome:
        count = decoded.count
        if count:
            spans = decoded.encoded if decoded.encoded is not None else decoded.rows
            if not self.queue.offer(spans):
                # refused, not dropped: the sender retries (503 / UNAVAILABLE)
                metrics.SPANS_REFUSED.labels(transport).inc(count)
                return Outcome(False, 0, 0, "queue full: retry later")
        metrics.SPANS_RECEIVED.labels(transport).inc(count + decoded.rejected)
        if decoded.rejected > out_of_window:
            metrics.SPANS_DROPPED.labels("invalid").inc(decoded.rejected - out_of_window)
        if out_of_window:
            metrics.SPANS_DROPPED.labels("out_of_window").inc(out_of_window)
        metrics.QUEUE_DEPTH.set(self.queue.depth)
        return Outcome(True, count, decoded.rejected, decoded.error)

    def refuse(self, req_spans: int, reason: str) -> None:
        metrics.SPANS_DROPPED.labels(reason).inc(req_spans)


__all__ = ["MAX_AHEAD", "Ingestor", "Outcome", "SpanWindow", "span_count"]
