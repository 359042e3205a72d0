"""The long-lived clients evidence gathering reads through, and the time bound on each source.

``EvidenceSources`` holds a Postgres pool, a Kafka admin client, a group-less consumer for end
offsets and another for dead-letter scans (each with the Kafka security settings of
:mod:`hoptrace.kafka`; one that cannot connect says why), so repeated lookups (dashboard, alerts, benchmark) pay
no connection set-up. Its own pool runs single read statements and nothing else (no transaction,
no ``SET``, no ``LISTEN``, no advisory lock), so a connection goes back to the pool without
asyncpg's session reset (a round trip on every release, inside every ``pool.fetch``). ``bounded`` runs one source's read within a timeout and records a source that
did not answer as missing evidence (never guessed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from hoptrace.kafka import client_options, explain
from hoptrace.settings import Settings, get_settings

T = TypeVar("T")

#: Seconds each source (spans, database, Kafka) may take before it counts as missing evidence.
DEFAULT_TIMEOUT = 3.0


async def _no_session_state(_conn: asyncpg.Connection) -> None:
    """Nothing to reset (see the module doc); asyncpg still rolls back an open transaction."""


def quote(name: str) -> str:
    """A table or column name (optionally schema-qualified) as a quoted SQL identifier."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


class EvidenceSources:
    """Long-lived, lazily started clients for evidence gathering. Use ``async with`` or
    ``start()``/``close()``; a client that fails to start is retried at the next lookup."""

    def __init__(
        self,
        settings: Settings | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        pool: asyncpg.Pool | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.timeout = timeout
        self.pool: asyncpg.Pool | None = pool
        self._own_pool = pool is None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.admin: AIOKafkaAdminClient | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self._scanner: AIOKafkaConsumer | None = None
        self.scan_lock = asyncio.Lock()
        self._coordinators: dict[str, int] = {}
        self._tables: dict[str, bool] = {}
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> EvidenceSources:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def db(self) -> asyncpg.Pool:
        async with self._lock:
            if self.pool is None:
                self.pool = await asyncpg.create_pool(
                    self.settings.database_url,
                    min_size=1,
                    max_size=4,
                    command_timeout=self.timeout,
                    reset=_no_session_state,
                )
        return self.pool

    async def kafka(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        async with self._lock:
            if self.admin is None:
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    request_timeout_ms=int(self.timeout * 1000),
                    **client_options(self.settings),
                )
                try:
                    await admin.start()
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        await admin.close()
                    await self._explained(exc)
                    raise
                self.admin = admin
            if self.consumer is None:
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=max(int(self.timeout * 1000), 1000),
                    **client_options(self.settings),
                )
                try:
                    await consumer.start()
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                    await self._explained(exc)
                    raise
                self.consumer = consumer
        return self.admin, self.consumer

    async def scanner(self) -> AIOKafkaConsumer:
        """A group-less consumer reserved for dead-letter scans (use under ``scan_lock``)."""
        async with self._lock:
            if self._scanner is None:
                scanner = AIOKafkaConsumer(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    fetch_max_wait_ms=5,  # never hold a scan on a long poll at a partition's end
                    **client_options(self.settings),
                )
                try:
                    await scanner.start()
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        await scanner.stop()
                    await self._explained(exc)
                    raise
                self._scanner = scanner
        return self._scanner

    async def _explained(self, exc: BaseException) -> None:
        """A Kafka client that could not start: raise why (a refused SASL login, nothing
        listening, ...) instead of aiokafka's "Unable to bootstrap" (the missing evidence
        names it). Anything else (a cancellation) is left to the caller to re-raise."""
        if isinstance(exc, KafkaError | OSError):
            raise await explain(exc, self.settings) from exc

    async def coordinator(self, group: str) -> int:
        if group not in self._coordinators:
            admin, _ = await self.kafka()
            self._coordinators[group] = await admin.find_coordinator(group)
        return self._coordinators[group]

    async def table_exists(self, pool: asyncpg.Pool, table: str) -> bool:
        if not self._tables.get(table):
            self._tables[table] = bool(
                await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", quote(table))
            )
        return self._tables[table]

    async def close(self) -> None:
        if self._scanner is not None:
            with contextlib.suppress(Exception):
                await self._scanner.stop()
            self._scanner = None
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            self.consumer = None
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.close()
            self.admin = None
        if self.pool is not None and self._own_pool:
            with contextlib.suppress(Exception):
                await self.pool.close()
            self.pool = None


async def bounded(
    name: str,
    make: Callable[[], Awaitable[T]],
    timeout: float,
    missing: dict[str, str],
    timings: dict[str, float],
) -> T | None:
    """``make()``'s result within ``timeout`` seconds, else None with ``missing[name]`` saying why;
    ``timings[name]`` gets the milliseconds it took either way."""
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(make(), timeout)
    except TimeoutError:
        missing[name] = f"timed out after {timeout:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure of a source is missing evidence
        missing[name] = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    finally:
        timings[name] = round((time.perf_counter() - t0) * 1000, 2)
    return None
