"""The dead-letter writer: a record that can never be processed (poison, non-retryable, out of
attempts) is copied to ``<topic>.dlq`` with the reason in headers, and its process span is
marked ERROR. It keeps trying while the dead-letter topic is unreachable: a record is never
committed before it is parked."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord
from opentelemetry.trace import Span, Status, StatusCode

from hoptrace.contract import conventions as c

from ..envelope import MAX_RECORD_BYTES
from ..producer import HopProducer
from .context import Abandon

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


def dead_letter_headers(
    record: ConsumerRecord,
    headers: Headers,
    step_id: str,
    reason: str,
    exc: BaseException,
    attempts: int,
) -> Headers:
    """The original headers (minus trace headers and earlier dead-letter headers) plus the
    reason, error type, step, source topic/partition/offset and attempts."""
    out = [
        (k, v)
        for k, v in headers
        if k not in c.TRACE_HEADERS and not k.startswith(c.DLQ_HEADER_PREFIX)
    ]
    out += [
        (c.DLQ_REASON_HEADER, reason.encode()[:4000]),
        (c.DLQ_ERROR_HEADER, type(exc).__name__.encode()),
        (c.DLQ_STEP_HEADER, step_id.encode()),
        (c.DLQ_SOURCE_TOPIC_HEADER, record.topic.encode()),
        (c.DLQ_SOURCE_PARTITION_HEADER, str(record.partition).encode()),
        (c.DLQ_SOURCE_OFFSET_HEADER, str(record.offset).encode()),
        (c.DLQ_ATTEMPTS_HEADER, str(attempts).encode()),
    ]
    return out


class DeadLetterWriter:
    """Parks records of step ``step_id`` through ``producer``; retries an unreachable topic
    with ``backoff_s`` doubling to ``max_backoff_s`` until ``stop_during`` says stop (then
    raises :class:`Abandon`: the record stays uncommitted)."""

    def __init__(
        self,
        producer: HopProducer,
        step_id: str,
        *,
        backoff_s: float,
        max_backoff_s: float,
        stop_during: Callable[[float], Awaitable[bool]],
    ) -> None:
        self.producer = producer
        self.step_id = step_id
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stop_during = stop_during

    async def write(
        self,
        record: ConsumerRecord,
        headers: Headers,
        span: Span,
        reason: str,
        exc: BaseException,
        attempts: int,
    ) -> None:
        """Copy ``record`` to its dead-letter topic and mark ``span`` ERROR (``attempts`` 0:
        never attempted, so the exception is recorded here)."""
        dlq = c.dlq_topic(record.topic)
        if span.is_recording():
            if attempts == 0:  # retried failures were recorded per attempt already
                span.record_exception(exc)
            span.set_attribute(c.ATTR_DLQ_TOPIC, dlq)
            span.set_attribute(c.ATTR_ERROR_REASON, reason[:1000])
            span.set_status(Status(StatusCode.ERROR, reason[:500]))
        out = dead_letter_headers(record, headers, self.step_id, reason, exc, attempts)
        delay = self.backoff_s
        value = record.value
        while True:
            try:
                await self.producer.send_raw(dlq, value, key=record.key, headers=out)
                return
            except MessageSizeTooLargeError:
                # never retried into a wedge: park the head of the value, say so in a header
                # (the full record stays at its source offset until the topic's retention)
                log.warning("%s: record too large for %s; parking its head", self.step_id, dlq)
                size = len(record.value or b"")
                value = (record.value or b"")[:MAX_RECORD_BYTES]
                out = [(k, v) for k, v in out if k != c.DLQ_TRUNCATED_HEADER]
                out.append((c.DLQ_TRUNCATED_HEADER, str(size).encode()))
                if len(value) == size:  # the headers alone are too large: drop the record value
                    value = b""
            except Exception as send_exc:  # noqa: BLE001 - keep the record until it is parked
                log.error("%s: cannot write to %s (%s); retrying", self.step_id, dlq, send_exc)
                if await self.stop_during(delay):
                    raise Abandon() from send_exc
                delay = min(self.max_backoff_s, delay * 2)
