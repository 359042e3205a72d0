"""The hop runtime: a worker registers a handler for its step; the runtime does the rest.

Per record: consume (manual commits) -> one process span named after the step, child of the
context in the record's headers -> correlation id from baggage, else header, else payload, else
poison -> parse the envelope (poison -> ``<topic>.dlq`` at once) -> ONE database transaction:
idempotency claim in ``processed_events`` (already there -> ``duplicate``: no handler call, the
stored next event is re-emitted), the handler's writes, the effect check, the processed mark with
the next event -> emit the next event (deterministic event id) -> commit the offset (after the
spans were exported). Retryable failures back off and retry; after the last attempt the record
is dead-lettered.

One module per job:

- ``runtime``: ``HopRuntime``: run/stop, SIGTERM/SIGINT, consumer set-up, the fetch loop
- ``record``: one record end to end (span, correlation id, attempts, the transaction, emit)
- ``lanes``: concurrent lanes per key, the commit watermark, back-pressure (pause/resume)
- ``ledger``: ``processed_events`` (DDL, guard, mark, mark-with-effect, effect checks)
- ``retry``: ``is_retryable`` / ``is_outage`` and the backoff
- ``dead_letter``: the dead-letter writer
- ``commits``: commit-after-export (pending offsets: flush, then commit)
- ``context`` / ``options``: what a handler sees (``HopContext``, ``Emit``...), ``HopOptions``
"""

from __future__ import annotations

from .context import EffectCheck, Emit, Handler, HopContext, HopHooks, RecordInfo
from .lanes import _slot
from .ledger import (
    PROCESSED_EVENTS_DDL,
    EffectMissing,
    default_effect_check,
    ensure_processed_events,
)
from .options import HopOptions
from .retry import is_outage, is_retryable
from .runtime import HopRuntime

__all__ = [
    "EffectCheck",
    "EffectMissing",
    "Emit",
    "Handler",
    "HopContext",
    "HopHooks",
    "HopOptions",
    "HopRuntime",
    "PROCESSED_EVENTS_DDL",
    "RecordInfo",
    "_slot",
    "default_effect_check",
    "ensure_processed_events",
    "is_outage",
    "is_retryable",
]
