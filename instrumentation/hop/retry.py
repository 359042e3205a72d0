"""Retry classification: which failures get another attempt (:func:`is_retryable`), which mean
a dependency is down or short of resources and are retried until it is back (:func:`is_outage`),
and the backoff.

PostgreSQL errors are told apart by SQLSTATE: classes ``08`` (connection exception) and ``53``
(insufficient resources: too many connections, disk full, out of memory) and ``57P0x``
(shutdown, crash, starting up, database dropped, idle-session timeout) are outages; ``40``,
``55`` and the rest of ``57`` / ``58`` get a few attempts. An asyncpg ``InterfaceError`` is an
outage only when it says the connection went away; any other one (two statements at once on
one connection, a misused transaction) is a bug in the handler: dead-lettered at once."""

from __future__ import annotations

import asyncpg
import httpx
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
)

from ..envelope import RetryableError
from .ledger import TABLE as _LEDGER_TABLE

#: SQLSTATE classes retried a few times, then dead-lettered (outage classes are retried on).
_RETRYABLE_SQLSTATE_CLASSES = ("40", "55", "57", "58")
#: SQLSTATE classes of an outage: connection exception, insufficient resources.
_OUTAGE_SQLSTATE_CLASSES = ("08", "53")
#: SQLSTATE prefix of an outage: operator intervention by shutdown/crash/startup (57P01-57P05).
_OUTAGE_SQLSTATE_PREFIX = "57P0"
#: asyncpg's words for a connection that is gone (closed, or taken back by its pool).
_GONE = ("connection is closed", "released back to the pool")


def _sqlstate(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return getattr(exc, "sqlstate", "") or ""
    return ""


def connection_gone(exc: BaseException) -> bool:
    """An asyncpg ``InterfaceError`` saying its connection is closed or back in its pool."""
    return isinstance(exc, asyncpg.InterfaceError) and any(w in str(exc) for w in _GONE)


def is_retryable(exc: BaseException) -> bool:
    """RetryableError, outages, retryable SQLSTATEs, httpx errors, Kafka errors, timeouts."""
    if isinstance(exc, RetryableError | httpx.HTTPError | KafkaError | OSError | TimeoutError):
        return True
    if isinstance(exc, asyncpg.InternalClientError):
        return True  # used while still consuming a terminated backend's error
    if isinstance(exc, asyncpg.InterfaceError):
        return connection_gone(exc)  # any other: the handler misused its connection
    if isinstance(exc, asyncpg.PostgresError):
        state = _sqlstate(exc)
        if state == "23505" and getattr(exc, "table_name", None) == _LEDGER_TABLE:
            return True  # another consumer marked it meanwhile: the retry sees a duplicate
        return is_outage(exc) or state[:2] in _RETRYABLE_SQLSTATE_CLASSES
    return False


def is_outage(exc: BaseException) -> bool:
    """A dependency is unreachable or short of resources (database down, restarting, out of
    connections or disk; broker unreachable; a downstream service refusing connections):
    retried until it is back, attempts not used up, so an outage never dead-letters (loses) a
    healthy record. Follows ``raise ... from``."""
    if exc.__cause__ is not None and exc.__cause__ is not exc and is_outage(exc.__cause__):
        return True
    if isinstance(
        exc,
        OSError
        | httpx.ConnectError
        | asyncpg.InternalClientError
        | KafkaConnectionError
        | KafkaTimeoutError
        | NodeNotReadyError,
    ):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return connection_gone(exc)
    state = _sqlstate(exc)
    return state[:2] in _OUTAGE_SQLSTATE_CLASSES or state.startswith(_OUTAGE_SQLSTATE_PREFIX)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """The wait after failed attempt ``attempt`` (1-based): ``base_s`` doubling, capped."""
    return min(max_s, base_s * (2 ** (min(attempt, 30) - 1)))
