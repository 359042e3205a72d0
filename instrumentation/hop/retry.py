"""Retry classification: which failures get another attempt (:func:`is_retryable`), which mean
a dependency is down and are retried until it is back (:func:`is_outage`), and the backoff."""

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

_RETRYABLE_SQLSTATE_CLASSES = ("08", "40", "53", "55", "57", "58")


def is_retryable(exc: BaseException) -> bool:
    """RetryableError, connection/DB-availability errors, httpx errors, Kafka errors, timeouts."""
    if isinstance(exc, RetryableError | httpx.HTTPError | KafkaError | OSError | TimeoutError):
        return True
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return True  # InternalClientError: used while still consuming a terminated backend's error
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state == "23505" and getattr(exc, "table_name", None) == _LEDGER_TABLE:
            return True  # another consumer marked it meanwhile: the retry sees a duplicate
        return state[:2] in _RETRYABLE_SQLSTATE_CLASSES
    return False


def is_outage(exc: BaseException) -> bool:
    """A dependency is unreachable (database down or restarting, broker unreachable, a
    downstream service refusing connections): retried until it is back, attempts not used up,
    so an outage never dead-letters (loses) a healthy record. Follows ``raise ... from``."""
    if exc.__cause__ is not None and exc.__cause__ is not exc and is_outage(exc.__cause__):
        return True
    if isinstance(
        exc,
        OSError
        | httpx.ConnectError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | KafkaConnectionError
        | KafkaTimeoutError
        | NodeNotReadyError,
    ):
        return True
    state = getattr(exc, "sqlstate", "") or "" if isinstance(exc, asyncpg.PostgresError) else ""
    return state[:2] == "08" or state in ("57P01", "57P02", "57P03")


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """The wait after failed attempt ``attempt`` (1-based): ``base_s`` doubling, capped."""
    return min(max_s, base_s * (2 ** (min(attempt, 30) - 1)))
