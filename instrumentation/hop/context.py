"""What a handler sees and returns, and the hooks around it: the types a worker's business code
uses (``HopContext``, ``Emit``, ``RecordInfo``, ``Handler``, ``EffectCheck``, ``HopHooks``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from opentelemetry.trace import Span

from hoptrace.contract import PipelineSpec, Step

from ..envelope import Envelope


@dataclass(slots=True)
class RecordInfo:
    """Where the record in hand came from."""

    topic: str
    partition: int
    offset: int
    group: str


@dataclass(slots=True)
class Emit:
    """What a handler returns: the next event (type, payload, version)."""

    type: str
    payload: dict[str, Any]
    version: int = 1


@dataclass(slots=True)
class HopContext:
    """Given to a handler. ``conn`` is inside the open transaction where the handler writes its
    rows (the processed mark is written in the same transaction after the effect check)."""

    envelope: Envelope
    correlation_id: str
    record: RecordInfo
    conn: asyncpg.Connection
    span: Span
    step: Step
    spec: PipelineSpec
    attempt: int = 1
    headers: dict[str, bytes] = field(default_factory=dict)


Handler = Callable[[HopContext], Awaitable[Emit | None]]
EffectCheck = Callable[[asyncpg.Connection, Envelope], Awaitable[bool]]
Hook = Callable[[HopContext], Awaitable[None]]


@dataclass(slots=True)
class HopHooks:
    """Failure-injection points (tests and fault switches). Each is awaited with the context.

    ``before_handle``: inside the transaction, before the handler (e.g. ``slow``).
    ``after_db_commit``: after the transaction committed, before the emit and the offset commit
    (e.g. ``crash-after-write``: raise or ``os._exit``). ``after_emit``: after the next event was
    acknowledged, before the offset commit."""

    before_handle: Hook | None = None
    after_db_commit: Hook | None = None
    after_emit: Hook | None = None


class Abandon(Exception):
    """Stop requested while the record in hand could not be finished: leave it uncommitted
    (raised by the retry loop and the dead-letter writer, caught by the record's lane)."""
