"""The dashboard's only way to data: ``hoptrace.collector.api`` through the read-only role
(:class:`~hoptrace.dashboard.api_source.ApiSource`), or, with ``HOPTRACE_API_URL`` set, the
collector's read API over HTTP (:class:`~hoptrace.dashboard.http_source.HttpSource`: no database
or Kafka credentials here).

Async API functions run on one background event loop per process (database pools are bound to a
loop). Pages get a :class:`Source`; tests may put their own in ``st.session_state[SOURCE_KEY]``."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, Protocol

SOURCE_KEY = "hoptrace_source"


class LookupError_(Exception):
    """Base for lookup problems shown to the user as a clear message."""


class MalformedId(LookupError_):
    """The text is not a correlation id."""


class UnknownId(LookupError_):
    """A well-formed id the store has never seen."""


class BadFilter(LookupError_):
    """A payments filter the read API refuses (the message says which and why)."""


class Overview(NamedTuple):
    """The overview page's reads: counts by state, the funnel and hop latencies since a time, and
    the stalled correlations (at most a limit)."""

    state_counts: Any
    funnel: Any
    hop_latencies: Any
    stalled: list[Any]


class Source(Protocol):
    """What the pages read. Every call is bounded (limits, time windows)."""

    def diagnose(self, correlation_id: str) -> Any: ...
    def spans(self, correlation_id: str) -> list[Any]: ...
    def overview(self, since: datetime, stalled_limit: int) -> Overview:
        """``state_counts``, ``funnel``, ``hop_latencies`` (since) and ``stalled`` (limit)."""
        ...

    def state_counts(self, since: datetime) -> Any: ...
    def funnel(self, since: datetime) -> Any: ...
    def hop_latencies(self, since: datetime) -> Any: ...
    def stalled(self, limit: int) -> list[Any]: ...
    def alerts(self, limit: int) -> list[Any]: ...
    def step_order(self) -> list[str]: ...
    def jaeger_url(self) -> str | None: ...
    def payments(self, params: dict[str, str]) -> dict[str, Any]:
        """One page of ``GET /api/v1/correlations`` for its query ``params``: ``items`` (the
        API's rows) and ``next_cursor``; :class:`BadFilter` for a bad filter."""
        ...

    def pipeline(self) -> dict[str, Any]:
        """The pipeline spec as the API's ``/pipeline`` gives it."""
        ...

    def stalled_counts(self) -> dict[str, int]:
        """Stalled payments now, by the step they wait on."""
        ...


class _Loop:
    """One event loop in a daemon thread; coroutines from any Streamlit thread run on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(
            target=self.loop.run_forever, name="hoptrace-dashboard-io", daemon=True
        ).start()

    def run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_loop: _Loop | None = None
_loop_lock = threading.Lock()


def run(value: Any, timeout: float = 20.0) -> Any:
    """The value, or the coroutine's result when ``value`` is awaitable."""
    global _loop
    if not inspect.isawaitable(value):
        return value
    with _loop_lock:
        if _loop is None:
            _loop = _Loop()
    return _loop.run(value, timeout)


def overview_of(source: Any, since: datetime, stalled_limit: int) -> Overview:
    """The source's combined overview read, or its four reads one by one."""
    if hasattr(source, "overview"):
        return source.overview(since, stalled_limit)
    return Overview(
        state_counts=source.state_counts(since),
        funnel=source.funnel(since),
        hop_latencies=source.hop_latencies(since),
        stalled=source.stalled(stalled_limit),
    )


def get_source() -> Source:
    """The source in ``st.session_state[SOURCE_KEY]`` if a test put one there, else the API."""
    import streamlit as st

    override = st.session_state.get(SOURCE_KEY)
    if override is not None:
        return override
    from hoptrace.collector.api import api_url

    if api_url() is not None:
        from hoptrace.dashboard.http_source import HttpSource

        return HttpSource.shared()
    from hoptrace.dashboard.api_source import ApiSource

    return ApiSource.shared()


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a sync or async API function and return its result."""
    return run(fn(*args, **kwargs))
