"""The real :class:`~hoptrace.dashboard.source.Source`: ``hoptrace.collector.api`` on a pool of the
read-only role (``get_settings().readonly_database_url()``). Overview reads are cached briefly."""

from __future__ import annotations

import asyncio
import atexit
import functools
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import streamlit as st

from hoptrace.collector import api
from hoptrace.collector.api import BadQuery
from hoptrace.contract import load_spec
from hoptrace.dashboard import frames
from hoptrace.dashboard.source import BadFilter, MalformedId, Overview, UnknownId, run
from hoptrace.settings import get_settings

#: Seconds an overview/alerts read stays cached (the pages' refresh is at least this coarse).
CACHE_TTL_S = 5
SPANS_LIMIT = 2000
#: Most recent payments whose hop latencies feed the percentiles and the histogram.
LATENCY_SAMPLES = 5000
#: Windows this long or longer are cached for a minute.
LONG_WINDOW = timedelta(hours=6)


class ApiSource:
    """Reads through the collector's API; one pool per read-only database URL per process."""

    _instances: ClassVar[dict[str, ApiSource]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _closed_at_exit: ClassVar[bool] = False

    def __init__(self, dsn: str, jaeger_url: str | None) -> None:
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
                if not cls._closed_at_exit:  # the pools and the API's Kafka clients
                    cls._closed_at_exit = True
                    atexit.register(cls.close_all)
            return inst

    @classmethod
    def close_all(cls) -> None:
        """Close every pool and the API's shared clients (tests; process exit)."""
        with cls._lock:
            instances = list(cls._instances.values())
            cls._instances.clear()
        for inst in instances:
            if inst._pool is not None:
                run(inst._pool.close())
        run(api.close())

    def pool(self) -> Any:
        with self._pool_lock:
            if self._pool is None:
                self._pool = run(api.connect(self.dsn))
            return self._pool

    def diagnose(self, correlation_id: str) -> Looked:
        """The diagnosis with the evidence it was decided on (Kafka and database facts, spans):
        one lookup, one evidence pass. :class:`Looked` reads like the diagnosis."""
        try:
            api.validate_id(correlation_id)
        except api.MalformedId as exc:
            raise MalformedId(str(exc)) from exc
        diagnosis = run(api.diagnose(correlation_id, pool=self.pool()))
        if not diagnosis.found:
            raise UnknownId(
                f"No payment with id '{correlation_id}' is known to hoptrace "
                "(no span carried it, and no row or record mentions it)."
            )
        return Looked(diagnosis, self._jaeger_url)

    def spans(self, correlation_id: str) -> list[Any]:
        return run(api.spans_for_correlation(self.pool(), correlation_id, limit=SPANS_LIMIT))

    def overview(self, since: datetime, stalled_limit: int) -> Overview:
        """The overview's four reads, run concurrently on the pool, cached as one. ``since`` is
        rounded to the cache's grain (5 s, or 60 s for windows of 6 hours and more: those scan
        many payments and a minute-old figure is fine), so refreshes share a cached read."""
        window = datetime.now(UTC) - since
        long = window >= LONG_WINDOW
        grain = 60 if long else CACHE_TTL_S
        since = datetime.fromtimestamp(since.timestamp() // grain * grain, tz=UTC)
        cached = _overview_long if long else _overview
        return cached(self, since, stalled_limit)

    def state_counts(self, since: datetime) -> Any:
        return self.overview(since, 0).state_counts

    def funnel(self, since: datetime) -> Any:
        return self.overview(since, 0).funnel

    def hop_latencies(self, since: datetime) -> Any:
        return self.overview(since, 0).hop_latencies

    def stalled(self, limit: int) -> list[Any]:
        return _stalled(self, limit)

    def alerts(self, limit: int) -> list[Any]:
        return _alerts(self, limit)

    def step_order(self) -> list[str]:
        return []  # the API's funnel is already in pipeline order

    def jaeger_url(self) -> str | None:
        return self._jaeger_url

    def payments(self, params: dict[str, str]) -> dict[str, Any]:
        return _payments(self, tuple(sorted(params.items())))

    def read_payments(self, params: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        try:
            return run(api.payments_page(self.pool(), self.spec(), dict(params)))
        except BadQuery as exc:
            raise BadFilter(str(exc)) from exc

    def spec(self) -> Any:
        return _spec(str(get_settings().pipeline))

    def pipeline(self) -> dict[str, Any]:
        return self.spec().to_dict()

    def stalled_counts(self) -> dict[str, int]:
        return _stalled_counts(self)

    def read_stalled_counts(self) -> dict[str, int]:
        return run(api.stalled_counts(self.pool()))

    def read_overview(self, since: datetime, stalled_limit: int) -> Overview:
        """The overview's reads, uncached (``stalled_limit`` 0: no stalled list)."""
        pool = self.pool()

        async def together() -> Overview:
            counts, funnel, latencies, stalled = await asyncio.gather(
                api.state_counts(pool, since),
                api.funnel(pool, since),
                api.hop_latencies(pool, since, limit=LATENCY_SAMPLES),
                api.stalled(pool, limit=stalled_limit) if stalled_limit else asyncio.sleep(0, []),
            )
            return Overview(counts, funnel, latencies, stalled)

        return run(together())

    def read_stalled(self, limit: int) -> list[Any]:
        return run(api.stalled(self.pool(), limit=limit))

    def read_alerts(self, limit: int) -> list[Any]:
        return run(api.alerts(self.pool(), limit=limit))


_HASH = {ApiSource: lambda s: s.dsn}


@functools.lru_cache(maxsize=4)
def _spec(path: str) -> Any:
    return load_spec(path)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _overview(source: ApiSource, since: datetime, stalled_limit: int) -> Overview:
    return source.read_overview(since, stalled_limit)


@st.cache_data(ttl=60, show_spinner=False, hash_funcs=_HASH)
def _overview_long(source: ApiSource, since: datetime, stalled_limit: int) -> Overview:
    return source.read_overview(since, stalled_limit)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _stalled(source: ApiSource, limit: int) -> list[Any]:
    return source.read_stalled(limit)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _payments(source: ApiSource, params: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return source.read_payments(params)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _stalled_counts(source: ApiSource) -> dict[str, int]:
    return source.read_stalled_counts()


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, hash_funcs=_HASH)
def _alerts(source: ApiSource, limit: int) -> list[Any]:
    return source.read_alerts(limit)


class Looked:
    """A diagnosis (its fields read through) with the facts the lookup page shows beside it,
    taken from the evidence the diagnosis was decided on (``Diagnosis.facts``)."""

    def __init__(self, diagnosis: api.Diagnosis, jaeger_url: str | None) -> None:
        self.diagnosis = diagnosis
        evidence = diagnosis.facts
        self.kafka_facts = frames.kafka_rows(evidence)
        self.db_facts = frames.db_rows(evidence)
        self.spans = list(evidence.spans) if evidence is not None else None
        links = (frames.jaeger_link(jaeger_url, t) for t in diagnosis.trace_ids)
        self.jaeger_urls = [u for u in links if u]  # none without a Jaeger configured

    def __getattr__(self, name: str) -> Any:
        return getattr(self.diagnosis, name)
