"""The one event envelope every pipeline step emits and consumes, and the two error kinds a
handler can signal (poison: dead-letter at once; retryable: back off, then dead-letter)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pydantic

_EVENT_NS = uuid.UUID("5f1c1c52-8a55-4c1e-9a67-6b7f0d6b6a11")

MAX_RECORD_BYTES = 512 * 1024
"""A record value larger than this is poison (an envelope is a few hundred bytes); the limit is
under the producer's default 1 MiB request size, so its dead-letter copy fits."""


class PoisonRecord(Exception):
    """A record that can never be processed (not JSON, schema mismatch, no correlation id, wrong
    type or version): it goes to the dead-letter topic at once."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryableError(Exception):
    """The handler asks for another attempt (backoff; dead-letter after the last attempt)."""


class Envelope(pydantic.BaseModel):
    """Event envelope: identity, type/version, correlation id, time and the business payload."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    event_id: str = pydantic.Field(min_length=1)
    type: str = pydantic.Field(min_length=1)
    version: int = pydantic.Field(ge=1)
    correlation_id: str = ""
    occurred_at: datetime
    payload: dict[str, Any] = pydantic.Field(default_factory=dict)

    @classmethod
    def new(
        cls,
        type: str,  # noqa: A002 - the envelope field is called type
        version: int,
        correlation_id: str,
        payload: dict[str, Any],
        event_id: str | None = None,
    ) -> Envelope:
        """A new envelope stamped now (UTC); a random event id unless one is given."""
        return cls(
            event_id=event_id or str(uuid.uuid4()),
            type=type,
            version=version,
            correlation_id=correlation_id,
            occurred_at=datetime.now(UTC),
            payload=payload,
        )

    def to_bytes(self) -> bytes:
        """JSON bytes for a Kafka record value."""
        return self.model_dump_json().encode()

    @classmethod
    def parse(cls, data: bytes | str | None) -> Envelope:
        """Bytes of a Kafka record value -> Envelope; raises PoisonRecord with the reason (for
        ANY failure: a record must never make the worker fail, see the hop runtime).

        A missing correlation id is NOT an error here (the hop runtime may find it in baggage or
        a header); the runtime decides when a record has none at all."""
        if data is None:
            raise PoisonRecord("empty record value")
        if len(data) > MAX_RECORD_BYTES:
            raise PoisonRecord(
                f"record of {len(data)} bytes is over the {MAX_RECORD_BYTES}-byte limit"
            )
        try:
            raw = json.loads(data)
        except RecursionError:  # e.g. "[" x 1,000: 2 KB deep enough for the decoder's limit
            raise PoisonRecord("not JSON the decoder can read: nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise PoisonRecord(f"not JSON: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - whatever a value does to the decoder: poison
            raise PoisonRecord(f"not JSON: {type(exc).__name__}: {exc}") from None
        if not isinstance(raw, dict):
            raise PoisonRecord(f"not a JSON object: {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                for err in exc.errors()
            )
            raise PoisonRecord(f"schema mismatch: {problems}") from None
        except RecursionError:
            raise PoisonRecord("schema mismatch: nested too deeply") from None
        except Exception as exc:  # noqa: BLE001 - never let a record's shape end the worker
            raise PoisonRecord(f"schema mismatch: {type(exc).__name__}: {exc}") from None

    def with_correlation_id(self, correlation_id: str) -> Envelope:
        """A copy carrying ``correlation_id``."""
        return self.model_copy(update={"correlation_id": correlation_id})


def next_event_id(source_event_id: str, step_id: str) -> str:
    """Deterministic id of the event a step emits for a source event (uuid5), so a re-emit after
    a crash carries the same id and downstream deduplicates it."""
    return str(uuid.uuid5(_EVENT_NS, f"{source_event_id}\x1f{step_id}"))
