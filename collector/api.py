"""The collector's ONE read facade (the dashboard, the CLI and the alerts import only this): the
diagnosis, the store's reads, the payments list, and the read API's client for callers that read
through ``HOPTRACE_API_URL`` instead of the database.

* ``await diagnose(cid, settings=None, pool=None) -> Diagnosis``: where a correlation stopped and
  why, with evidence (spans, Kafka, database; gathered once, kept in ``Diagnosis.facts``),
  ``found=False`` for an unknown id, :class:`MalformedId` (a ``ValueError``) for an id that
  cannot be one.
* ``await gather_evidence(cid, ...) -> Evidence``: the raw evidence alone.
* ``await cause_for(cid) -> (cause, one-line evidence)``: the stall scanner's alert hook.
* Store pass-throughs with the store's signatures (pool first): ``connect``,
  ``spans_for_correlation``, ``spans_for_trace``, ``correlation``, ``stalled``, ``alerts``,
  ``alerts_for_correlation``, ``state_counts``, ``funnel``, ``hop_latencies``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg

from hoptrace.contract import CAUSES, PipelineSpec, load_spec
from hoptrace.ids import PATTERN, validate_correlation_id
from hoptrace.settings import Settings, get_settings

from .api_client import ApiError, ReadApiClient, api_url
from .api_query import BadQuery
from .diagnosis import Diagnosis, StepResult
from .evidence import EvidenceSources, gather, lookup
from .listing import page as payments_page
from .listing import stalled_counts
from .records import (
    SOURCE_DEAD_LETTERS,
    DlqRecord,
    Evidence,
    GroupMember,
    KafkaFacts,
    ProcessedEvent,
    RecordRef,
    SpanRecord,
)
from .store import (
    AlertRow,
    CorrelationRow,
    HopLatency,
    StallRow,
    alerts,
    alerts_for_correlation,
    connect,
    correlation,
    funnel,
    hop_latencies,
    spans_for_correlation,
    spans_for_trace,
    stalled,
    state_counts,
)

#: What a correlation id may look like (format and length).
ID_PATTERN = PATTERN


class MalformedId(ValueError):
    """The text cannot be a correlation id."""


def validate_id(cid: str) -> str:
    """``cid`` when it is a correlation id (:func:`hoptrace.ids.validate_correlation_id`)."""
    try:
        return validate_correlation_id(cid)
    except ValueError as exc:
        raise MalformedId(str(exc)) from None


# one set of long-lived clients per (event loop, database, Kafka, pool) ------------------------
_sources: dict[tuple[int, str, str, int], EvidenceSources] = {}
_specs: dict[str, PipelineSpec] = {}


def _spec_for(settings: Settings) -> PipelineSpec:
    key = str(settings.pipeline)
    if key not in _specs:
        _specs[key] = load_spec(settings.pipeline)
    return _specs[key]


def sources_for(
    settings: Settings | None = None, pool: asyncpg.Pool | None = None
) -> EvidenceSources:
    """Shared evidence clients for this event loop (created on first use)."""
    settings = settings or get_settings()
    loop = asyncio.get_running_loop()
    for key in [k for k, v in _sources.items() if v.loop is not None and v.loop.is_closed()]:
        del _sources[key]
    key = (id(loop), settings.database_url, settings.kafka_bootstrap, id(pool) if pool else 0)
    src = _sources.get(key)
    if src is None:
        src = _sources[key] = EvidenceSources(settings, pool=pool)
        src.loop = loop
    return src


async def close() -> None:
    """Close the shared clients of the running event loop."""
    loop = asyncio.get_running_loop()
    for key, src in list(_sources.items()):
        if src.loop is loop:
            del _sources[key]
            await src.close()


async def gather_evidence(
    cid: str,
    settings: Settings | None = None,
    pool: asyncpg.Pool | None = None,
    spec: PipelineSpec | None = None,
) -> Evidence:
    """The evidence alone (a diagnosis carries it too: ``Diagnosis.facts``)."""
    validate_id(cid)
    settings = settings or get_settings()
    return await gather(cid, spec or _spec_for(settings), sources_for(settings, pool))


async def diagnose(
    cid: str,
    settings: Settings | None = None,
    pool: asyncpg.Pool | None = None,
    spec: PipelineSpec | None = None,
    now: datetime | None = None,
) -> Diagnosis:
    """Where ``cid`` stopped and why, with the evidence it was decided on in ``facts`` (gathered
    once). ``pool``: an existing pool on the store (e.g. the dashboard's read-only role); default:
    a shared pool on ``HOPTRACE_DATABASE_URL``."""
    validate_id(cid)
    settings = settings or get_settings()
    spec = spec or _spec_for(settings)
    return await lookup(cid, spec, sources_for(settings, pool), now=now)


async def cause_for(cid: str) -> tuple[str | None, str | None]:
    """The stall scanner's hook: the cause code and its deciding evidence on one line."""
    d = await diagnose(cid)
    if not d.found:
        return None, None
    line = "; ".join(d.evidence[:3])
    if d.next_action:
        line = f"{line} -> {d.next_action}" if line else d.next_action
    return d.cause, line[:1000]


__all__ = [
    "CAUSES",
    "SOURCE_DEAD_LETTERS",
    "ApiError",
    "BadQuery",
    "DlqRecord",
    "GroupMember",
    "KafkaFacts",
    "ProcessedEvent",
    "ReadApiClient",
    "RecordRef",
    "api_url",
    "payments_page",
    "stalled_counts",
    "AlertRow",
    "CorrelationRow",
    "Diagnosis",
    "Evidence",
    "HopLatency",
    "MalformedId",
    "SpanRecord",
    "StallRow",
    "StepResult",
    "alerts",
    "alerts_for_correlation",
    "cause_for",
    "close",
    "connect",
    "correlation",
    "diagnose",
    "funnel",
    "gather_evidence",
    "hop_latencies",
    "sources_for",
    "spans_for_correlation",
    "spans_for_trace",
    "stalled",
    "state_counts",
    "validate_id",
]
