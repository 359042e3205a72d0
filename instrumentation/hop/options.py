"""How a hop runtime runs: one frozen dataclass of options (everything but its collaborators)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any


@dataclass(frozen=True, slots=True)
class HopOptions:
    """How a :class:`HopRuntime` runs (everything but its collaborators).

    ``group`` overrides the spec's group (to reproduce the wrong-group fault);
    ``verify_effect=False`` ONLY reproduces the legacy mark-before-verify bug;
    ``receive_spans=True`` keeps the aiokafka instrumentation's per-record receive span (off by
    default: the process span is the child of the same extracted context and carries the same
    messaging attributes); ``send_spans=True`` keeps the aiokafka send span of the emit (off by
    default: the process span records the emitted record's topic/partition/offset and is the
    next hop's parent, through traceparent + baggage in the record's headers);
    ``trace_bookkeeping=True`` traces the runtime's own guard/mark queries too (the handler's
    queries are always traced); ``commit_after_export=True`` (the default) commits offsets every
    ``commit_interval_s`` after exporting the spans of the records handled, so a SIGKILL never
    leaves a committed record without its step span. Records of different keys are handled
    concurrently, in up to ``max_lanes`` lanes (a key always in the same lane, in offset order;
    each lane with its own connection); a partition with ``lane_buffer`` records waiting is
    paused until its lanes catch up. ``ledger_retention``: the step's processed marks older than
    this are purged (at start, then every ``ledger_purge_interval_s``); keep it longer than the
    consumed topic's retention plus the longest redelivery delay, since a record that can still
    be redelivered needs its mark (None: never purge)."""

    bootstrap: str
    database_url: str
    group: str | None = None
    verify_effect: bool = True
    max_attempts: int = 5
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    auto_offset_reset: str = "earliest"
    handle_signals: bool = True
    consumer_opts: Mapping[str, Any] = field(default_factory=dict)
    flush_timeout_s: float = 5.0
    receive_spans: bool = False
    send_spans: bool = False
    trace_bookkeeping: bool = False
    commit_after_export: bool = True
    commit_interval_s: float = 0.2
    max_lanes: int = 8
    lane_buffer: int = 200
    ledger_retention: timedelta | None = timedelta(days=14)
    ledger_purge_interval_s: float = 3600.0

    def replace(self, **changes: Any) -> HopOptions:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)
