"""What the export to the collector did, counted: the exporter wrapper (hold and retry a failed
batch, then a cool-down), the batch processor that counts the spans a full queue drops, the log
filter that replaces the SDK's per-span "Queue full" warning with a rate-limited one, and
``export_stats()``. ``hoptrace.instrumentation.tracing`` builds the export pipeline from these.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger("hoptrace.instrumentation.tracing")


class _Stats:
    """Counters behind ``export_stats()`` (thread-safe enough: ints under the GIL + a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exported = 0
        self.export_failed = 0
        self.dropped_queue_full = 0
        self.skipped_unreachable = 0
        self.ended = 0
        self.export_cpu_s = 0.0  # CPU of the export calls (encode + send), on their thread
        self._last_warning = 0.0

    def warn_dropped(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning(
                "tracing: %d span(s) dropped so far (%d queue full, %d export failed); "
                "the business path is unaffected",
                self.dropped_queue_full + self.export_failed,
                self.dropped_queue_full,
                self.export_failed,
            )


_stats = _Stats()


class CountingExporter(SpanExporter):
    """Wraps the real exporter: counts exported and failed spans, never lets an error escape.
    A failed batch is held and retried (0.5 s, then every 1 s) for up to ``hold_s`` on the
    batch thread, so a collector restart or outage shorter than that loses nothing (new spans
    wait in the bounded queue; the business path is never blocked). After a batch is given up,
    batches are dropped unseen for a cool-down (1 s doubling to 30 s) so an unreachable
    collector costs no encoding or connection CPU."""

    def __init__(
        self,
        inner: SpanExporter,
        hold_s: float = 0.0,
        after_export: Callable[[], None] | None = None,
    ) -> None:
        self.inner = inner
        self.hold_s = hold_s
        self.after_export = after_export
        self.closing = threading.Event()
        self._open_until = 0.0
        self._cooldown = 1.0

    def _try(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self.inner.export(spans)
        except Exception:  # noqa: BLE001 - an exporter bug must not kill the export thread
            log.debug("tracing: exporter raised", exc_info=True)
            return SpanExportResult.FAILURE

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        cpu0 = time.thread_time()
        try:
            return self._export(spans)
        finally:
            _stats.export_cpu_s += time.thread_time() - cpu0

    def _export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        now = time.monotonic()
        if now < self._open_until:
            with _stats.lock:
                _stats.export_failed += len(spans)
                _stats.skipped_unreachable += len(spans)
                _stats.warn_dropped()
            return SpanExportResult.FAILURE
        result = self._try(spans)
        end, delay = time.monotonic() + self.hold_s, 0.5
        while result is not SpanExportResult.SUCCESS and time.monotonic() + delay < end:
            if self.closing.wait(delay):
                break
            delay = 1.0  # a returning collector gets the backlog within ~1 s
            result = self._try(spans)
        with _stats.lock:
            if result is SpanExportResult.SUCCESS:
                _stats.exported += len(spans)
                self._cooldown = 1.0
                self._open_until = 0.0
            else:
                _stats.export_failed += len(spans)
                self._open_until = time.monotonic() + self._cooldown
                self._cooldown = min(30.0, self._cooldown * 2)
                _stats.warn_dropped()
        if self.after_export is not None:
            self.after_export()
        return result

    def shutdown(self) -> None:
        self.closing.set()
        with contextlib.suppress(Exception):
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return self.inner.force_flush(timeout_millis)
        except Exception:  # noqa: BLE001
            return False


class CountingBatchProcessor(BatchSpanProcessor):
    """BatchSpanProcessor that counts spans it has to drop because its queue is full."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        bp = getattr(self, "_batch_processor", None)
        self._queue = getattr(bp, "_queue", None)  # looked up once, not per span
        self._queue_max = getattr(bp, "_max_queue_size", 0)

    def on_end(self, span: ReadableSpan) -> None:
        _stats.ended += 1
        queue = self._queue
        if queue is not None and len(queue) >= self._queue_max:
            with _stats.lock:
                _stats.dropped_queue_full += 1
                _stats.warn_dropped()
            # what the SDK does with a full queue (the oldest span goes), without the log
            # record it makes per dropped span (collector down: every span)
            if span.context is not None and span.context.trace_flags.sampled:
                queue.appendleft(span)
            return
        super().on_end(span)


class SuppressQueueFullLogs(logging.Filter):
    """The SDK logs one warning per dropped span; we count them and warn at a rate instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Queue full" not in str(record.msg)


def export_stats() -> dict[str, int]:
    """Counts since process start: spans ``exported``, ``export_failed`` (incl.
    ``skipped_unreachable``: dropped unseen during the cool-down after a failed export),
    ``dropped_queue_full``, ``dropped`` (failed + queue full), ``ended`` and
    ``export_cpu_us`` (CPU spent in export calls: encoding and sending)."""
    with _stats.lock:
        return {
            "exported": _stats.exported,
            "export_failed": _stats.export_failed,
            "dropped_queue_full": _stats.dropped_queue_full,
            "skipped_unreachable": _stats.skipped_unreachable,
            "dropped": _stats.export_failed + _stats.dropped_queue_full,
            "ended": _stats.ended,
            "export_cpu_us": int(_stats.export_cpu_s * 1e6),
        }
