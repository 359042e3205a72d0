"""The real :class:`~hoptrace.dashboard.source.Source`: ``hoptrace.collector.api`` on a pool of the
read-only role (``get_settings().readonly_database_url()``). Overview reads are cached briefly."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, ClassVar

import streamlit as st

try:
    from hoptrace.collector import api
except ImportError:  # pragma: no cover - until the diagnosis API lands, its store pass-throughs
    from hoptrace.collector import store as api  # type: ignore[no-redef]
from hoptrace.dashboard.source import MalformedId, UnknownId, run
from hoptrace.settings import get_settings

#: Seconds an overview/alerts read stays cached (the pages' refresh is at least this coarse).
CACHE_TTL_S = 5
SPANS_LIMIT = 2000


class ApiSource:
    """Reads through the collector's API; one pool per read-only database URL per process."""

    _instances: ClassVar[dict[str, ApiSource]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, dsn: str, jaeger_url: str) -> None:
        self.dsn = dsn
        self._jaeger_url = jaeger_url
        self._pool: Any = None
        self._pool_lock = threading.Lock()

    @classmethod
    def shared(cls) -> ApiSource:
        settings = get_settings()
        dsn = settings.readonly_database_url()
        with cls._lock:
            inst = cls._instances.get(dsn)
            if inst is None:
                inst = cls._instances[dsn] = cls(dsn, settings.jaeger_url)
            return inst

    def pool(self) -> Any:
        with self._pool_lock:
            if self._pool is None:
                self._pool = run(api.connect(self.dsn))
            return self._pool

    def diagnose(self, correlation_id: str) -> Any:
        try:
            result = run(api.diagnose(correlation_id, pool=self.pool()))
        except Exception as exc:
            kind = type(exc).__name__.lower()
            if "malformed" in kind or "invalid" in kind or isinstance(exc, ValueError):
                raise MalformedId(str(exc) or f"'{correlation_id}' is not a valid id") from exc
            if "unknown" in kind or "notfound" in kind or isinstance(exc, LookupError):
                raise UnknownId(str(exc) or f"No payment with id '{correlation_id}'") from exc
            raise
        if getattr(result, "found", True) is False:
            raise UnknownId(f"No payment with id '{correlation_id}' is known to hoptrace.")
        return result

    def spans(self, correlation_id: str) -> list[Any]:
        return run(api.spans_for_correlation(self.pool(), correlation_id, limit=SPANS_LIMIT))

    def state_counts(self, since: datetime) -> Any:
        return _cached(self, "state_counts", since)

    def funnel(self, since: datetime) -> Any:
        return _cached(self, "funnel", since)

    def hop_latencies(self, since: datetime) -> Any:
        return _cached(self, "hop_latencies", since)

    def stalled(self, limit: int) -> list[Any]:
        return _cached(self, "stalled", limit)

    def alerts(self, limit: int) -> list[Any]:
        return _cached(self, "alerts", limit)

    def step_order(self) -> list[str]:
        return []  # the API's funnel is already in pipeline order

    def jaeger_url(self) -> str:
        return self._jaeger_url

    def read(self, name: str, arg: Any) -> Any:
        fn = getattr(api, name)
        if name in ("stalled", "alerts"):
            return run(fn(self.pool(), limit=arg))
        return run(fn(self.pool(), arg))


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs={ApiSource: lambda s: s.dsn})
def _cached(source: ApiSource, name: str, arg: Any) -> Any:
    return source.read(name, arg)
