"""Export to more than the collector: ``HOPTRACE_EXPORT_ALSO`` names more OTLP gRPC endpoints
(e.g. the local stack's Jaeger) that get every span too. Each extra endpoint has its own bounded
queue and export thread (:class:`~opentelemetry.sdk.trace.export.BatchSpanProcessor`) and is best
effort: a batch that fails there is dropped, never held, never counted in ``export_stats()``, and
a flush (what offset commits and the outbox relay wait for) waits for the collector's export
only (:class:`Fanout`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger(__name__)


class Fanout(SpanProcessor):
    """Hands each ended span to several export processors: the collector's first, then the
    extra endpoints' of ``HOPTRACE_EXPORT_ALSO``. A flush waits for the collector's export only
    (offset commits and the outbox relay wait for it; an extra endpoint that is slow or down must
    never hold them): the extras export on their own schedule."""

    def __init__(self, processors: Sequence[SpanProcessor]) -> None:
        self.processors = tuple(processors)

    def on_end(self, span: ReadableSpan) -> None:
        for proc in self.processors:
            proc.on_end(span)

    def shutdown(self) -> None:
        for proc in self.processors:
            with contextlib.suppress(Exception):
                proc.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.processors[0].force_flush(timeout_millis)


class _BestEffortExporter(SpanExporter):
    """An extra endpoint's exporter: failures are logged (at most every 60 s) and the batch
    dropped; nothing of it reaches ``export_stats()`` (those count the collector's export)."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self.inner = inner
        self.endpoint = endpoint
        self._warned = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # noqa: BLE001 - an extra endpoint never breaks anything
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS and time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            log.warning("tracing: export to %s failed; its spans are dropped", self.endpoint)
        return result

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return self.inner.force_flush(timeout_millis)
        except Exception:  # noqa: BLE001
            return False


def extra_processors(
    endpoints: str | None,
    opts: dict[str, Any],
    make_exporter: Callable[[dict[str, Any]], SpanExporter | None],
) -> list[SpanProcessor]:
    """One batch processor per extra OTLP gRPC endpoint (``HOPTRACE_EXPORT_ALSO``, comma-
    separated); ``make_exporter`` builds the exporter of ``{"endpoint", "protocol"}`` as the
    collector's is built (native encoder, the standard ``OTEL_*`` headers and timeout)."""
    out: list[SpanProcessor] = []
    for endpoint in (e.strip() for e in (endpoints or "").split(",")):
        if not endpoint:
            continue
        inner = make_exporter({"endpoint": endpoint, "protocol": "grpc"})
        if inner is None:
            continue
        out.append(
            BatchSpanProcessor(
                _BestEffortExporter(inner, endpoint),
                max_queue_size=opts.get("max_queue_size"),
                schedule_delay_millis=opts.get("schedule_delay_millis", 500),
                max_export_batch_size=opts.get("max_export_batch_size"),
            )
        )
    return out
