"""The kept asyncpg instrumentation (opentelemetry-instrumentation-asyncpg), with its per-call
work on a statement's span done once per statement: for ``execute``/``fetch*`` the span name
(leading comment stripped, first word) and the connection/statement attributes depend only on
the statement and the connection's database, user and address, so they are computed once and
reused. Same spans, same attributes, same error handling as the library's wrapper; cursors,
prepared statements and ``capture_parameters`` go through the library unchanged.

Also here: :func:`untraced`, the hop runtime's own statements (guard, processed mark) past the
instrumentation's wrapper instead of through it under suppression.

Relies on the library's ``_do_execute``, ``_hydrate_span_from_args``, ``_leading_comment_remover``
and ``_semconv_opt_in_mode`` (tested versions: ``hoptrace.instrumentation._accel.TESTED``)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import asyncpg.pool
from opentelemetry import context, trace
from opentelemetry.instrumentation import asyncpg as _otel_asyncpg
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanKind, Status, StatusCode

#: Statements remembered per process (a worker runs a handful; past this, no caching).
MAX_CACHED = 1024

_SpanInfo = tuple[str, dict[str, Any]]


class CachingAsyncPGInstrumentor(_otel_asyncpg.AsyncPGInstrumentor):
    """AsyncPGInstrumentor whose ``_do_execute`` reuses the span name and attributes of a
    statement already seen on the same database/user/address."""

    _instance = None  # BaseInstrumentor's singleton: this class's own, not the parent's
    _span_info: dict[tuple[Any, ...], _SpanInfo] = {}

    def _info(self, instance: Any, query: str) -> _SpanInfo:
        params = getattr(instance, "_params", None)
        key = (
            query,
            getattr(params, "database", None),
            getattr(params, "user", None),
            getattr(instance, "_addr", None),
        )
        info = self._span_info.get(key)
        if info is None:
            try:  # the library's naming: leading comment stripped, first word
                name = self._leading_comment_remover.sub("", query).split()[0]
            except IndexError:
                name = ""
            attrs = _otel_asyncpg._hydrate_span_from_args(
                instance, query, None, semconv_opt_in_mode=self._semconv_opt_in_mode
            )
            info = (name, attrs)
            if len(self._span_info) < MAX_CACHED:
                self._span_info[key] = info
        return info

    def _do_execute(self, func: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        """The wrapper wrapt calls: returns the awaitable the caller awaits. Suppressed, that is
        the call itself (no extra coroutine frame on every resumption of the query)."""
        if not is_instrumentation_enabled():  # suppressed: the call alone, as the library
            return func(*args, **kwargs)
        if self.capture_parameters or not args or not isinstance(args[0], str) or not args[0]:
            return super()._do_execute(func, instance, args, kwargs)
        return self._traced(func, instance, args, kwargs)

    async def _traced(self, func: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        name, attrs = self._info(instance, args[0])
        # start_as_current_span + use_span, unrolled (no generator context managers per call)
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)
        token = context.attach(trace.set_span_in_context(span))
        try:
            return await func(*args, **kwargs)
        except Exception as exc:
            if span.is_recording():
                span.set_status(Status(StatusCode.ERROR))  # the library's wrapper
                if _otel_asyncpg._report_new(self._semconv_opt_in_mode):
                    span.set_attribute(_otel_asyncpg.ERROR_TYPE, type(exc).__qualname__)
                span.record_exception(exc)  # use_span's, on the way out
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            context.detach(token)
            span.end()


def untraced(conn: Any, name: str) -> Callable[..., Awaitable[Any]]:
    """Connection method ``name`` of ``conn`` (a pool's proxy or a connection) without the
    asyncpg instrumentation's wrapper (wrapt keeps the original function as ``__wrapped__``;
    a pool's proxy keeps its connection as ``_con``): no span and none of the wrapper's
    per-call work. The plain path runs the wrapped method under ``suppress_instrumentation()``."""
    raw = conn._con if isinstance(conn, asyncpg.pool.PoolConnectionProxy) else conn
    if not isinstance(raw, asyncpg.Connection):  # released proxy, or not asyncpg's
        return getattr(conn, name)
    method = getattr(type(raw), name)
    return functools.partial(getattr(method, "__wrapped__", method), raw)
