"""Lanes, watermark and back-pressure: records of different keys are handled concurrently.

A fetched record goes to the lane of its key (:func:`_slot`: one key, one lane, so a
correlation's records keep their order); each lane is a task handling its records one at a
time, in offset order, with its own database connection (``lane_key`` tells the running task
which). A partition's offset to commit is the one after the longest run of finished records
from the start (:class:`Watermark`: a kill redelivers the rest). A partition with
``lane_buffer`` records waiting is paused until its lanes are down to half of that.

Rebalances: a batch is dispatched only if its partition was not revoked since the fetch returned
it (:attr:`Lanes.epoch`, read as the fetch returns and passed back to :meth:`Lanes.dispatch`).
Otherwise a batch fetched before a revoke could land after it, in the new watermark of a
partition that came back, ahead of the records re-fetched from the committed offset, and commit
past them unhandled. (The consumer fetches a dropped batch again: a new assignment starts from
the committed offset.)
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import zlib
from collections import deque
from collections.abc import Awaitable, Callable

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from .context import Abandon

log = logging.getLogger(__name__)

#: The lane the running task works for: its DB connection slot (-1: not a lane's task).
lane_key: contextvars.ContextVar[int] = contextvars.ContextVar("hoptrace_hop_lane", default=-1)


class Lane:
    """Records of some keys (correlation ids), handled one at a time in offset order by one
    task with its own database connection. Lanes run concurrently; one key is never in two
    lanes, so the records of one key keep their order."""

    __slots__ = ("key", "queue", "task", "current")

    def __init__(self, key: int) -> None:
        self.key = key
        self.queue: deque[ConsumerRecord] = deque()
        self.task: asyncio.Task[None] | None = None
        self.current: ConsumerRecord | None = None


def _slot(key: bytes | None, partition: int, lanes: int) -> int:
    """The lane of a record: one key, one lane, so a correlation's records stay in order
    (a record without a key: its partition's lane)."""
    return (zlib.crc32(key) if key is not None else partition) % lanes


class Watermark:
    """A partition's records handed to lanes, in offset order: the offset to commit is the
    one after the longest run of finished records from the start (a kill redelivers the rest)."""

    __slots__ = ("started_", "finished_")

    def __init__(self) -> None:
        self.started_: deque[int] = deque()
        self.finished_: set[int] = set()

    def started(self, offset: int) -> None:
        self.started_.append(offset)

    def finished(self, offset: int) -> int | None:
        """Record ``offset`` is finished; returns the new offset to commit, if it moved."""
        self.finished_.add(offset)
        upto = None
        while self.started_ and self.started_[0] in self.finished_:
            first = self.started_.popleft()
            self.finished_.discard(first)
            upto = first + 1
        return upto


class Lanes:
    """The lanes of one consumer. ``process`` handles one record; ``pause`` / ``resume`` apply
    back-pressure to a partition; ``stop`` set: lanes finish the record in hand and leave the
    rest."""

    def __init__(
        self,
        max_lanes: int,
        lane_buffer: int,
        *,
        process: Callable[[ConsumerRecord], Awaitable[object]],
        pause: Callable[[TopicPartition], None],
        resume: Callable[[TopicPartition], None],
        stop: asyncio.Event,
    ) -> None:
        self.max_lanes = max(1, max_lanes)
        self.lane_buffer = max(1, lane_buffer)
        self._process = process
        self._pause = pause
        self._resume = resume
        self._stop = stop
        self.lanes: dict[int, Lane] = {}
        self.paused: set[TopicPartition] = set()
        self.waiting: dict[TopicPartition, int] = {}  # records queued or in hand
        self.marks: dict[TopicPartition, Watermark] = {}
        self.failed = asyncio.Event()  # a lane's task ended with an error
        #: Revokes so far; a fetch notes it as it returns its batch (see :meth:`dispatch`).
        self.epoch = 0
        self._revoked_at: dict[TopicPartition, int] = {}
        self.dropped = 0  # records of stale batches not dispatched

    def dispatch(
        self, tp: TopicPartition, records: list[ConsumerRecord], fetched_at: int | None = None
    ) -> bool:
        """Hand fetched records to their lanes (starting a lane's task when idle). A batch
        returned by a fetch at ``fetched_at`` (:attr:`epoch` then) is dropped when ``tp`` was
        revoked since: the consumer fetches those records again (from the committed offset)
        if the partition is ours again. Returns whether the batch was dispatched."""
        if fetched_at is not None and self._revoked_at.get(tp, -1) > fetched_at:
            self.dropped += len(records)
            log.info(
                "dropped %d records of %s:%s fetched before it was revoked (from offset %s)",
                len(records),
                tp.topic,
                tp.partition,
                records[0].offset if records else "-",
            )
            return False
        mark = self.marks.get(tp)
        if mark is None:
            mark = self.marks[tp] = Watermark()
        for record in records:
            mark.started(record.offset)
            slot = _slot(record.key, tp.partition, self.max_lanes)
            lane = self.lanes.get(slot)
            if lane is None:
                lane = self.lanes[slot] = Lane(slot)
            lane.queue.append(record)
            if lane.task is None or lane.task.done():
                lane.task = asyncio.create_task(self._run(lane), name=f"hop-lane-{slot}")
                lane.task.add_done_callback(self._done)
        waiting = self.waiting[tp] = self.waiting.get(tp, 0) + len(records)
        if waiting >= self.lane_buffer:
            # back-pressure: fetch no more of it until its lanes caught up (see _run)
            self._pause(tp)
            self.paused.add(tp)
        return True

    def finished(self, tp: TopicPartition, offset: int) -> int | None:
        """A lane finished ``offset``: the partition's new offset to commit, if it moved (None
        too when the partition was revoked meanwhile: its new owner handles it again)."""
        mark = self.marks.get(tp)
        return None if mark is None else mark.finished(offset)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failed.set()

    async def _run(self, lane: Lane) -> None:
        lane_key.set(lane.key)  # this task's context only: the lane's DB connection slot
        queue = lane.queue
        while queue and not self._stop.is_set():
            record = lane.current = queue.popleft()
            try:
                await self._process(record)
            except Abandon:
                log.info(
                    "stop requested: left %s:%s@%s uncommitted",
                    record.topic,
                    record.partition,
                    record.offset,
                )
                return
            finally:
                lane.current = None
                tp = TopicPartition(record.topic, record.partition)
                left = self.waiting[tp] = self.waiting.get(tp, 1) - 1
            if tp in self.paused and left <= self.lane_buffer // 2:
                self.paused.discard(tp)
                self._resume(tp)

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        """Partitions taken away: drop their waiting records (their new owner gets them from
        the committed offset), wait briefly for a record of theirs in hand; records of theirs
        still in hand after this are not committed. Batches fetched before now are dropped
        for them (:meth:`dispatch`)."""
        self.epoch += 1
        for tp in revoked:
            self._revoked_at[tp] = self.epoch
        parts = {tp.partition for tp in revoked}
        busy = []
        for lane in self.lanes.values():
            kept = [r for r in lane.queue if r.partition not in parts]
            if len(kept) != len(lane.queue):
                lane.queue.clear()
                lane.queue.extend(kept)
            if lane.current is not None and lane.current.partition in parts and lane.task:
                busy.append(lane.task)
        self.paused -= revoked
        if busy:
            await asyncio.wait(busy, timeout=10)
        for tp in revoked:
            self.marks.pop(tp, None)
            self.waiting.pop(tp, None)

    async def drain(self) -> None:
        """After stop: wait for the lanes to finish the record in hand; a lane that failed
        raises its error here (it ends the runtime with it)."""
        tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self.lanes.values():
            if lane.task is not None and lane.task.done() and not lane.task.cancelled():
                exc = lane.task.exception()
                if exc is not None:
                    raise exc

    def cancel(self) -> None:
        """Cancel every lane's task (the lanes go with the loop)."""
        for lane in self.lanes.values():
            if lane.task is not None and not lane.task.done():
                lane.task.cancel()
