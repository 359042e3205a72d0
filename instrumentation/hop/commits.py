"""Commit-after-export: a handled record's offset is committed only once its spans were
exported (flush, then commit), so a SIGKILL never leaves a committed record without its step
span (the collector would call it ``consumed_without_trace``). Offsets wait in ``pending``; a
loop flushes the tracing pipeline every ``interval_s`` and commits them. While spans cannot be
exported (collector down) offsets wait up to :data:`UNFLUSHED_COMMIT_S`, then are committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from ..tracing import flush_tracing

log = logging.getLogger(__name__)

#: Offsets wait at most this long for their spans to be exported (then they are committed).
UNFLUSHED_COMMIT_S = 120.0


class OffsetCommits:
    """Pending offsets and the commit loop of one consumer (``consumer()`` gives it: the
    runtime creates it at ``run``)."""

    def __init__(
        self,
        consumer: Callable[[], AIOKafkaConsumer | None],
        *,
        interval_s: float,
        flush_timeout_s: float,
        backoff_s: float,
    ) -> None:
        self.consumer = consumer
        self.interval_s = interval_s
        self.flush_timeout_s = flush_timeout_s
        self.backoff_s = backoff_s
        self.pending: dict[TopicPartition, int] = {}
        self.task: asyncio.Task[None] | None = None
        self._unflushed_since: float | None = None

    def start(self) -> None:
        """Start the commit loop (offsets are deferred to it from now on)."""
        self.task = asyncio.create_task(self._loop(), name="hop-offset-commits")

    async def stop(self) -> None:
        """Stop the loop and commit what is pending (after a flush)."""
        if self.task is None:
            return
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        self.task = None
        with contextlib.suppress(Exception):
            await self.commit_pending()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit ``offsets`` (partition -> next offset): deferred to the loop while it runs
        (a process killed before that gets the records again, a duplicate, never a lost step
        span), at once otherwise."""
        if self.task is not None and not self.task.done():
            self.pending.update(offsets)
            return
        await self.commit_offsets(offsets)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.commit_pending()
            except Exception:  # noqa: BLE001 - the offsets stay uncommitted: redelivered
                log.warning("deferred offset commit failed", exc_info=True)

    async def commit_pending(self) -> None:
        """Export the spans of the records handled so far, then commit their offsets."""
        if not self.pending:
            return
        offsets, self.pending = self.pending, {}
        flushed = await asyncio.to_thread(flush_tracing, self.flush_timeout_s)
        now = time.monotonic()
        since = self._unflushed_since = self._unflushed_since or now
        if not flushed and now - since < UNFLUSHED_COMMIT_S:
            # the spans are still queued (collector down): a kill now must redeliver, not lose
            for tp, offset in offsets.items():
                self.pending.setdefault(tp, offset)  # a newer offset of the same partition wins
            return
        self._unflushed_since = None
        await self.commit_offsets(offsets)

    async def commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit now (three tries on a Kafka error; a rebalance's failure is only logged)."""
        consumer = self.consumer()
        assert consumer is not None
        for attempt in range(1, 4):
            try:
                await consumer.commit(offsets)
                return
            except CommitFailedError as exc:
                log.warning(
                    "offset commit failed (rebalanced?): %s; record may be redelivered", exc
                )
                return
            except KafkaError as exc:
                if attempt == 3:
                    log.warning("offset commit failed: %s; record may be redelivered", exc)
                    return
                await asyncio.sleep(self.backoff_s * attempt)

    async def flush(self) -> bool:
        """Export what is queued (at the end of a run), off the event loop."""
        return await asyncio.to_thread(flush_tracing, self.flush_timeout_s)
