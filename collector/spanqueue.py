"""The bounded in-memory queue between the receivers and the writer, sized in spans.

Receivers :meth:`offer` (never wait: a full queue means 429/503 to the sender, which retries);
the Kafka source :meth:`put` (waits for room). The queue remembers when it last turned spans
away: :meth:`behind` tells the stall scan that spans are being held by their senders (or left in
Kafka), so deadlines passing meanwhile may already be met by spans that have not arrived. An item
may carry a future that the writer resolves once its spans are committed (the Kafka source
commits offsets only then). An item holds either Python span rows or natively encoded COPY
tuples (:class:`~.decode.Encoded`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from .decode import Encoded, SpanRow

Spans = list[SpanRow] | Encoded


def span_total(spans: Spans) -> int:
    return spans.n if type(spans) is Encoded else len(spans)  # type: ignore[union-attr,arg-type]


@dataclass(slots=True)
class Item:
    spans: Spans
    n: int
    done: asyncio.Future[None] | None = None


class SpanQueue:
    def __init__(self, max_spans: int) -> None:
        self.max_spans = max_spans
        self._items: deque[Item] = deque()
        self._size = 0
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        #: ``time.monotonic()`` when a request last did not fit (refused, or made to wait)
        self.refused_at: float | None = None

    @property
    def depth(self) -> int:
        """Spans waiting to be written."""
        return self._size

    def fits(self, n: int) -> bool:
        """Would ``n`` spans be accepted now? (An oversized single request is accepted into an
        empty queue rather than refused forever.) Every caller turns away (or holds back) what
        does not fit, so a False is remembered for :meth:`behind`."""
        if self._size == 0 or self._size + n <= self.max_spans:
            return True
        self.refused_at = time.monotonic()
        return False

    def behind(self, within: float) -> bool:
        """Is span intake behind: the queue full now, or spans turned away in the last
        ``within`` seconds?"""
        if self._size >= self.max_spans:
            return True
        return self.refused_at is not None and time.monotonic() - self.refused_at < within

    def offer(self, spans: Spans, done: asyncio.Future[None] | None = None) -> bool:
        """Enqueue without waiting; False when full (nothing enqueued)."""
        n = span_total(spans)
        if not self.fits(n):
            return False
        self._items.append(Item(spans, n, done))
        self._size += n
        self._nonempty.set()
        if self._size >= self.max_spans:
            self._room.clear()
        return True

    async def put(self, spans: Spans, done: asyncio.Future[None] | None = None) -> None:
        """Enqueue, waiting for room."""
        while not self.offer(spans, done):
            self._room.clear()
            await self._room.wait()

    async def take(self, max_spans: int) -> list[Item]:
        """Wait for at least one item, then take items up to ``max_spans`` spans (at least one)."""
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
        out: list[Item] = []
        n = 0
        while self._items and (not out or n + self._items[0].n <= max_spans):
            item = self._items.popleft()
            out.append(item)
            n += item.n
        self._size -= n
        if not self._items:
            self._nonempty.clear()
        if self._size < self.max_spans:
            self._room.set()
        return out
