"""Library calls whose instrumentation spans are not wanted, through public API only.

``suppress_instrumentation()`` is OpenTelemetry's way to say "no spans for this call"; the
asyncpg and httpx instrumentations check it, but the aiokafka instrumentation (0.66b1) does not:
its send/getone/getmany wrappers start their spans whatever the context says. So hoptrace hands
that instrumentation a :class:`SuppressibleTracerProvider`: the API's ``TracerProvider`` whose
tracers return the API's ``INVALID_SPAN`` (what a no-op tracer returns: not recorded, nothing
injected into headers) while instrumentation is suppressed, and the real tracer's span
otherwise (same scope, same spans).

:func:`quiet` runs a call in an empty context with instrumentation suppressed: no span, and no
trace context or baggage a wrapper could inject into the record's headers (the caller injects
its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, suppress_instrumentation
from opentelemetry.util import types


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """An empty context with instrumentation suppressed, for the block."""
    token = context_api.attach(context_api.Context())
    try:
        with suppress_instrumentation():
            yield
    finally:
        context_api.detach(token)


class SuppressibleTracer(trace.Tracer):
    """A tracer that makes no span while instrumentation is suppressed (else: ``inner``'s)."""

    def __init__(self, inner: trace.Tracer) -> None:
        self.inner = inner

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        if not is_instrumentation_enabled():  # the current context, not the parent given
            return trace.INVALID_SPAN
        return self.inner.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        if not is_instrumentation_enabled():
            yield trace.INVALID_SPAN
            return
        with self.inner.start_as_current_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
            end_on_exit,
        ) as span:
            yield span


class SuppressibleTracerProvider(trace.TracerProvider):
    """``inner``'s tracers, each wrapped in a :class:`SuppressibleTracer`."""

    def __init__(self, inner: trace.TracerProvider) -> None:
        self.inner = inner

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return SuppressibleTracer(self.inner.get_tracer(*args, **kwargs))
