"""A :class:`~hoptrace.dashboard.source.Source` on the collector's read API over HTTP
(``HOPTRACE_API_URL``, bearer ``HOPTRACE_API_TOKEN``): the dashboard then holds no database or
Kafka credentials. A lookup is one call (the trace document with its spans); the overview's
reads are one call (``/overview``), cached briefly like the database source's."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any, ClassVar

import streamlit as st

from hoptrace.collector.api import ApiError, ReadApiClient
from hoptrace.contract import State
from hoptrace.dashboard.remote import RemoteLooked, stall_rows
from hoptrace.dashboard.source import BadFilter, MalformedId, Overview, UnknownId
from hoptrace.ids import validate_correlation_id
from hoptrace.settings import get_settings

#: Seconds a read stays cached (the pages' refresh is at least this coarse).
CACHE_TTL_S = 5
#: Stalled and failed payments read at most (the overview shows the stalled ones).
STALLS_LIMIT = 1000


class HttpSource:
    """Reads through one collector's read API; one client per (URL, token) per process."""

    _instances: ClassVar[dict[str, HttpSource]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, client: ReadApiClient, jaeger_url: str) -> None:
        self.client = client
        self._jaeger_url = jaeger_url
        self._tables: list[str] | None = None

    @classmethod
    def shared(cls) -> HttpSource:
        client = ReadApiClient.from_env()
        with cls._lock:
            inst = cls._instances.get(client.url)
            if inst is None:
                inst = cls._instances[client.url] = cls(client, get_settings().jaeger_url)
            else:
                client.close()
            return inst

    def key(self) -> str:
        return self.client.url

    def diagnose(self, correlation_id: str) -> RemoteLooked:
        try:
            validate_correlation_id(correlation_id)
        except ValueError as exc:
            raise MalformedId(str(exc)) from exc
        try:
            doc = self.client.trace_document(correlation_id, spans=True)
        except ApiError as exc:
            if exc.status == 404:
                raise UnknownId(exc.detail) from exc
            if exc.status == 400:
                raise MalformedId(exc.detail) from exc
            raise
        if self._tables is None:
            self._tables = [s["id"] for s in self.pipeline()["steps"] if s.get("table")]
        return RemoteLooked(doc, self._tables)

    def spans(self, correlation_id: str) -> list[Any]:
        return list(self.client.trace_document(correlation_id, spans=True).get("spans") or [])

    def overview(self, since: datetime, stalled_limit: int) -> Overview:
        since = datetime.fromtimestamp(since.timestamp() // CACHE_TTL_S * CACHE_TTL_S, since.tzinfo)
        data = _overview(self, since.isoformat())
        latencies = {step: hop.get("samples", []) for step, hop in data["hop_latencies"].items()}
        stalled = self.stalled(stalled_limit) if stalled_limit else []
        return Overview(data["state_counts"], data["funnel"], latencies, stalled)

    def state_counts(self, since: datetime) -> Any:
        return self.overview(since, 0).state_counts

    def funnel(self, since: datetime) -> Any:
        return self.overview(since, 0).funnel

    def hop_latencies(self, since: datetime) -> Any:
        return self.overview(since, 0).hop_latencies

    def stalled(self, limit: int) -> list[Any]:
        rows = stall_rows(_stalls(self))
        return [r for r in rows if r.state == State.STALLED.value][:limit]

    def alerts(self, limit: int) -> list[Any]:
        return _alerts(self, limit)

    def step_order(self) -> list[str]:
        return [s["id"] for s in self.pipeline()["steps"]]

    def jaeger_url(self) -> str:
        return self._jaeger_url

    def payments(self, params: dict[str, str]) -> dict[str, Any]:
        try:
            return _payments(self, tuple(sorted(params.items())))
        except ApiError as exc:
            if exc.status == 400:
                raise BadFilter(exc.detail) from exc
            raise

    def pipeline(self) -> dict[str, Any]:
        return _pipeline(self)

    def stalled_counts(self) -> dict[str, int]:
        now = datetime.now(UTC)
        since = datetime.fromtimestamp(now.timestamp() // CACHE_TTL_S * CACHE_TTL_S, UTC)
        return dict(_overview(self, since.isoformat())["stalled_counts"])


_HASH = {HttpSource: HttpSource.key}


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _overview(source: HttpSource, since: str) -> dict[str, Any]:
    return source.client.overview(since, samples=True)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _stalls(source: HttpSource) -> list[dict[str, Any]]:
    return source.client.stalls(STALLS_LIMIT)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _alerts(source: HttpSource, limit: int) -> list[dict[str, Any]]:
    return source.client.alerts(limit)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _payments(source: HttpSource, params: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return source.client.correlations(**dict(params))


@st.cache_data(ttl=60, show_spinner=False, hash_funcs=_HASH)
def _pipeline(source: HttpSource) -> dict[str, Any]:
    return source.client.pipeline()
