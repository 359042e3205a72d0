"""hoptrace.instrumentation: what any worker imports so its business code is only business code.

- ``envelope``: the event envelope, PoisonRecord / RetryableError, header and baggage names
- ``tracing``: ``configure_tracing`` / ``shutdown_tracing`` / ``export_stats`` /
  ``correlation_context``
- ``otlp``: the SDK's OTLP gRPC/HTTP span exporters with the native encoder (hoptrace_native;
  the SDK's encoder without it)
- ``asyncpg_spans``: the kept asyncpg instrumentation, each statement's span name and
  attributes computed once
- ``producer``: ``HopProducer`` (emit with correlation carry) and ``step_span`` (producer-only step)
- ``hop``: ``HopRuntime`` (consume -> idempotent, effect-verified handle -> emit -> commit)
- ``spec``: the pipeline spec loader
- ``conventions``: span attribute names the collector relies on
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
