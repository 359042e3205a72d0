"""The dead-letter scan: find the record of one correlation in a step's dead-letter topic (by its
``x-correlation-id`` header) and the reason its ``x-dlq-reason`` header gives.

Bounded: the partition the correlation id hashes to first (records are keyed by it), then the
others; from the time the failed run started when known, else the last :data:`DLQ_SCAN_LIMIT`
records of each partition; until a deadline.
"""

from __future__ import annotations

import time
from datetime import datetime

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from hoptrace.contract.conventions import CORRELATION_HEADER, DLQ_REASON_HEADER

from .evidence_clients import EvidenceSources
from .records import DlqRecord

#: Records read from the end of each dead-letter partition when looking for the correlation.
DLQ_SCAN_LIMIT = 2000
#: Seconds of slack around the failed run's times (clocks of worker and broker differ).
_SLACK_S = 5


async def dlq_lookup(
    sources: EvidenceSources,
    dlq: str,
    cid: str,
    deadline: float,
    since: datetime | None = None,
    until: datetime | None = None,
) -> DlqRecord | None:
    """Scan the tail of ``dlq`` for a record whose correlation header is ``cid``: the partition
    its key (the correlation id) hashes to first, then the others; at most ``DLQ_SCAN_LIMIT``
    records per partition, until ``deadline`` (``time.monotonic()``)."""
    admin, consumer = await sources.kafka()
    described = await admin.describe_topics([dlq])
    if not described or described[0].get("error_code") != 0:
        return None
    parts = sorted(p["partition"] for p in described[0]["partitions"])
    tps = [TopicPartition(dlq, p) for p in parts]
    ends = await consumer.end_offsets(tps)
    begins = await consumer.beginning_offsets(tps)
    todo = [tp for tp in tps if ends[tp] > begins[tp]]
    if not todo:
        return None
    starts = {tp: max(begins[tp], ends[tp] - DLQ_SCAN_LIMIT) for tp in todo}
    if since is not None:
        # dead-lettered when the failed run ended: start at that time, not at the tail
        at = int((since.timestamp() - _SLACK_S) * 1000)
        found = await consumer.offsets_for_times({tp: at for tp in todo})
        for tp in todo:
            hit = found.get(tp)
            starts[tp] = hit.offset if hit is not None else ends[tp]
        todo = [tp for tp in todo if starts[tp] < ends[tp]]
    until_ms = int((until.timestamp() + _SLACK_S) * 1000) if until is not None else None
    keyed = DefaultPartitioner()(cid.encode(), parts, parts)
    first = [tp for tp in todo if tp.partition == keyed]
    rest = [tp for tp in todo if tp.partition != keyed]
    scanner = await sources.scanner()
    async with sources.scan_lock:
        for group in (first, rest):  # records keyed by the correlation id sit in one partition
            if not group or time.monotonic() >= deadline:
                continue
            scanner.assign(group)
            for tp in group:
                scanner.seek(tp, starts[tp])
            left = set(group)
            while left and time.monotonic() < deadline:
                batch = await scanner.getmany(*left, timeout_ms=100)
                for tp, records in batch.items():
                    for rec in records:
                        headers = dict(rec.headers or ())
                        raw = headers.get(CORRELATION_HEADER)
                        if raw is not None and raw.decode("utf-8", "replace") == cid:
                            reason = headers.get(DLQ_REASON_HEADER)
                            return DlqRecord(
                                dlq,
                                tp.partition,
                                rec.offset,
                                reason.decode("utf-8", "replace") if reason else None,
                            )
                        if rec.offset + 1 >= min(ends[tp], starts[tp] + DLQ_SCAN_LIMIT) or (
                            until_ms is not None and rec.timestamp > until_ms
                        ):
                            left.discard(tp)
    return None
