"""hoptrace.instrumentation: what any worker imports so its business code is only business code.

- ``envelope``: the event envelope, PoisonRecord / RetryableError, ``next_event_id``
- ``tracing``: ``configure_tracing`` / ``shutdown_tracing`` / ``flush_tracing`` /
  ``export_stats`` / ``correlation_context``
- ``producer``: ``HopProducer`` (emit with correlation carry) and ``step_span`` (producer-only step)
- ``hop``: ``HopRuntime`` (consume -> idempotent, effect-verified handle -> emit -> commit), a
  package with one module per job (lifecycle, record, lanes, ledger, retry, dead letters, commits)
- ``http``: ``HttpClient``, a handler's traced JSON client for a downstream service
- ``settings``: ``InstrumentationSettings`` (``HOPTRACE_ACCEL``, ``HOPTRACE_EXPORT_HOLD_S``,
  ``HOPTRACE_EXPORT_STATS_DIR``)
- ``quiet``: calls without instrumentation spans through public API (suppression, and a tracer
  provider that makes the aiokafka instrumentation honour it)
- ``_accel``: every speed-up that reaches into a library's private API (lean SDK spans, cached
  asyncpg spans and untraced bookkeeping, native-encoder OTLP exporters, aiokafka shortcuts,
  the HTTP transport pool). One switch, ``HOPTRACE_ACCEL=0``, turns them all off (default on);
  each also checks at start-up that the installed library versions are ones its differential
  test ran against, and otherwise falls back to the library's public API by itself, with one
  log line saying which speed-up is off and why. Both paths make the same spans
  (``tests/instrumentation/test_accel_differential.py``). Workers never import it.

The pipeline spec (``load_spec``) and the span conventions live in ``hoptrace.contract``.
"""

from hoptrace.contract import PipelineSpec, SpecError, Step, load_spec
from hoptrace.contract.conventions import BAGGAGE_KEY, CORRELATION_HEADER

from .envelope import (
    Envelope,
    PoisonRecord,
    RetryableError,
    next_event_id,
)
from .hop import (
    EffectCheck,
    EffectMissing,
    Emit,
    Handler,
    HopContext,
    HopHooks,
    HopOptions,
    HopRuntime,
    RecordInfo,
    ensure_processed_events,
)
from .http import HttpClient
from .producer import HopProducer, step_span
from .tracing import (
    configure_tracing,
    correlation_context,
    export_stats,
    flush_tracing,
    shutdown_tracing,
)

__all__ = [
    "BAGGAGE_KEY",
    "CORRELATION_HEADER",
    "EffectCheck",
    "EffectMissing",
    "Emit",
    "Envelope",
    "Handler",
    "HopContext",
    "HopHooks",
    "HopOptions",
    "HopProducer",
    "HttpClient",
    "HopRuntime",
    "PipelineSpec",
    "PoisonRecord",
    "RecordInfo",
    "RetryableError",
    "SpecError",
    "Step",
    "configure_tracing",
    "correlation_context",
    "ensure_processed_events",
    "export_stats",
    "flush_tracing",
    "load_spec",
    "next_event_id",
    "shutdown_tracing",
    "step_span",
]
