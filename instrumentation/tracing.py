"""Tracing setup in one call: OTel SDK provider, OTLP export chosen by the standard ``OTEL_*``
variables, a bounded BatchSpanProcessor whose drops are counted, BaggageSpanProcessor limited to
``hoptrace.correlation_id``, and the kept instrumentations for aiokafka, asyncpg and httpx.

Tracing never blocks or breaks the business path: export runs on the batch processor's thread;
a collector that is down, unreachable or slow only makes spans drop (counted, warned about with
a rate limit), never raises into the caller.

The global TracerProvider can be set only once per process: the first ``configure_tracing`` fixes
the resource (service name: ``OTEL_SERVICE_NAME``, else ``service.name`` in
``OTEL_RESOURCE_ATTRIBUTES``, else the name the caller passes); a later call with another
``exporter=`` (tests) swaps the export pipeline on the same provider.

``HOPTRACE_EXPORT_ALSO`` names more OTLP gRPC endpoints (comma-separated, e.g. the local stack's
Jaeger) that get every span too, each through its own bounded queue and on its own thread, best
effort: a batch that fails there is dropped and never holds or counts against the export to the
collector.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opentelemetry import baggage, context, trace
from opentelemetry.processor.baggage import BaggageSpanProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
)

from hoptrace.contract import conventions as c
from hoptrace.contract.conventions import BAGGAGE_KEY

from ._accel import Speedup, enabled
from .export_stats import (
    CountingBatchProcessor,
    CountingExporter,
    SuppressQueueFullLogs,
    export_stats,
)
from .extra_export import Fanout, extra_processors
from .quiet import SuppressibleTracerProvider
from .settings import instrumentation_settings

log = logging.getLogger(__name__)

TRACER_NAME = "hoptrace.instrumentation"
_lock = threading.RLock()
_state: _State | None = None


class _SwitchableProcessor(SpanProcessor):
    """The provider's one span processor (no per-span loop over a processor list): copies the
    correlation baggage onto each starting span through ``baggage`` (BaggageSpanProcessor
    limited to the key) and hands ended spans to the current export processor, which a later
    configure can swap."""

    def __init__(self, baggage: SpanProcessor) -> None:
        self.baggage = baggage
        self.current: SpanProcessor | None = None

    def on_start(self, span: Any, parent_context: context.Context | None = None) -> None:
        self.baggage.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        cur = self.current
        if cur is not None:
            cur.on_end(span)

    def shutdown(self) -> None:
        cur, self.current = self.current, None
        if cur is not None:
            cur.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        cur = self.current
        return cur.force_flush(timeout_millis) if cur is not None else True


def _service_name(given: str) -> str | None:
    """The service name the code passes, unless the environment names the service
    (``OTEL_SERVICE_NAME`` or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``): then None, and
    the SDK's resource detection takes it from there (the standard's precedence)."""
    if os.environ.get("OTEL_SERVICE_NAME", "").strip():
        return None
    for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == c.RESOURCE_SERVICE_NAME and value.strip():
            return None
    return given


class _State:
    def __init__(self, service_name: str, provider: TracerProvider, switch: _SwitchableProcessor):
        self.service_name = service_name
        self.provider = provider
        self.switch = switch
        self.exporter_key: object = None
        self.instrumented = False
        self.tracer: trace.Tracer | None = None
        self.stats_dir: Path | None = None  # HOPTRACE_EXPORT_STATS_DIR at the last configure


def _provider(resource: Resource) -> TracerProvider:
    """The SDK's TracerProvider, or its lean variant when the speed-up allows."""
    if enabled(Speedup.LEAN_SPANS):
        from ._accel.lean_spans import LeanTracerProvider

        return LeanTracerProvider(resource=resource)
    return TracerProvider(resource=resource)


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _default_exporter(opts: dict[str, Any]) -> SpanExporter | None:
    """OTLP exporter chosen by OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL;
    endpoint, headers, timeout and TLS come from the standard OTEL_* variables. The SDK's
    exporters; when the speed-up allows, batches serialized by hoptrace_native (``_accel.otlp``)."""
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if kind in ("none", ""):
        return None
    protocol = (
        (
            opts.pop("protocol", None)
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        .strip()
        .lower()
    )
    endpoint = opts.pop("endpoint", None)
    kwargs: dict[str, Any] = {}
    native = enabled(Speedup.OTLP)
    if protocol.startswith("http"):
        if endpoint:
            kwargs["endpoint"] = endpoint.rstrip("/") + (
                "" if endpoint.rstrip("/").endswith("/v1/traces") else "/v1/traces"
            )
        if native:
            from ._accel.otlp import http_exporter

            return http_exporter(**kwargs)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(**kwargs)
    if endpoint:
        kwargs["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["insecure"] = True
    if native:
        from ._accel.otlp import grpc_exporter

        return grpc_exporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcSpanExporter,
    )

    return GrpcSpanExporter(**kwargs)


def _instrument(provider: TracerProvider) -> None:
    """Install the kept instrumentations once. The aiokafka instrumentation does not check
    ``suppress_instrumentation()`` itself: it gets a provider that does (see ``quiet``)."""
    from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    pg: Any = AsyncPGInstrumentor()
    if not pg.is_instrumented_by_opentelemetry and enabled(Speedup.ASYNCPG_SPANS):
        from ._accel.asyncpg_spans import CachingAsyncPGInstrumentor

        pg = CachingAsyncPGInstrumentor()
    for inst, given in (
        (AIOKafkaInstrumentor(), SuppressibleTracerProvider(provider)),
        (pg, provider),
        (HTTPXClientInstrumentor(), provider),
    ):
        if not inst.is_instrumented_by_opentelemetry:
            try:
                inst.instrument(tracer_provider=given)
            except Exception:  # noqa: BLE001 - missing instrumentation: trace less, run anyway
                log.warning("tracing: could not instrument %s", type(inst).__name__, exc_info=True)


def configure_tracing(
    service_name: str,
    *,
    exporter: SpanExporter | None = None,
    **opts: Any,
) -> TracerProvider:
    """Set up tracing for this process and return its TracerProvider (idempotent).

    Options (all optional): ``endpoint`` and ``protocol`` ("grpc" | "http/protobuf") override
    the OTEL_* variables; ``max_queue_size`` (2048), ``schedule_delay_millis`` (500),
    ``max_export_batch_size`` (512), ``export_timeout_millis``; ``simple=True`` exports each
    span synchronously (tests only); ``instrument=False`` skips the library instrumentations;
    ``resource_attributes`` adds resource attributes; ``hold_s`` how long a failed batch is
    held and retried (``HOPTRACE_EXPORT_HOLD_S``, 60; 0 drops it at once). The speed-ups
    (``HOPTRACE_ACCEL``, see ``_accel``) choose the provider, the exporters and the asyncpg
    instrumentation here.

    With ``OTEL_SDK_DISABLED=true`` nothing is exported and no library is instrumented.
    """
    global _state
    with _lock:
        key: object = exporter if exporter is not None else ("default", repr(sorted(opts.items())))
        if _state is not None:
            if _state.switch.current is not None and (
                (exporter is None and not opts)
                or _state.exporter_key is key
                or _state.exporter_key == key
            ):
                return _state.provider
            if _state.service_name != service_name:
                log.info(
                    "tracing: provider already set up for %r; keeping that resource",
                    _state.service_name,
                )
        else:
            # the distro name tells the collector this service's steps report themselves
            attrs: dict[str, Any] = {c.RESOURCE_DISTRO_NAME: c.DISTRO_NAME}
            code_name = _service_name(service_name)
            if code_name is not None:  # OTEL_SERVICE_NAME (or the resource variable) wins
                attrs[c.RESOURCE_SERVICE_NAME] = code_name
            attrs.update(opts.pop("resource_attributes", None) or {})
            resource = Resource.create(attrs)
            service_name = str(resource.attributes.get(c.RESOURCE_SERVICE_NAME, service_name))
            provider = _provider(resource)
            switch = _SwitchableProcessor(BaggageSpanProcessor(lambda k: k == BAGGAGE_KEY))
            provider.add_span_processor(switch)
            trace.set_tracer_provider(provider)
            if trace.get_tracer_provider() is not provider:
                log.warning("tracing: a global TracerProvider was already set; using it")
            _state = _State(service_name, provider, switch)
            for name in ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export"):
                logging.getLogger(name).addFilter(SuppressQueueFullLogs())
        state = _state
        instrument = opts.pop("instrument", True)
        if _sdk_disabled():
            state.exporter_key = key
            return state.provider
        if instrument and not state.instrumented:
            _instrument(state.provider)
            state.instrumented = True
        inner = exporter if exporter is not None else _default_exporter(dict(opts))
        new: SpanProcessor | None = None
        settings = instrumentation_settings()
        state.stats_dir = settings.export_stats_dir
        if inner is not None:
            hold = 0.0 if opts.get("simple") else opts.get("hold_s", settings.export_hold_s)
            counted = CountingExporter(inner, hold_s=hold, after_export=_dump_stats)
            if opts.get("simple"):
                new = SimpleSpanProcessor(counted)
            else:
                new = CountingBatchProcessor(
                    counted,
                    max_queue_size=opts.get("max_queue_size"),
                    schedule_delay_millis=opts.get("schedule_delay_millis", 500),
                    max_export_batch_size=opts.get("max_export_batch_size"),
                    export_timeout_millis=opts.get("export_timeout_millis"),
                )
                if exporter is None:  # the default export: extra endpoints too, if any
                    extra = extra_processors(settings.export_also, opts, _default_exporter)
                    if extra:
                        new = Fanout([new, *extra])
        old, state.switch.current = state.switch.current, new
        state.exporter_key = key
        if old is not None:
            _shutdown_processor(old, 2.0)
        return state.provider


def _shutdown_processor(proc: SpanProcessor, timeout_s: float) -> None:
    """Flush and shut down in a helper thread, waiting at most ``timeout_s``."""

    def run() -> None:
        with contextlib.suppress(Exception):
            proc.force_flush(int(timeout_s * 1000))
        with contextlib.suppress(Exception):
            proc.shutdown()

    worker = threading.Thread(target=run, name="hoptrace-tracing-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning(
            "tracing: flush did not finish within %.1fs; remaining spans dropped", timeout_s
        )


_flush: tuple[threading.Thread, threading.Event, list[bool]] | None = None


def flush_tracing(timeout_s: float = 5.0) -> bool:
    """Export what is queued, waiting at most ``timeout_s`` (never raises). True once it was
    exported (or given up after the hold). A flush still running (e.g. held while the collector
    is down) is joined, not duplicated: it drains the queue, later spans included."""
    global _flush
    state = _state
    if state is None or state.switch.current is None:
        return True
    with _lock:
        cur = _flush
        if cur is None or not cur[0].is_alive():
            done = threading.Event()
            ok: list[bool] = [False]

            def run() -> None:
                try:
                    ok[0] = bool(state.switch.force_flush(int(timeout_s * 1000)))
                except Exception:  # noqa: BLE001
                    ok[0] = False
                finally:
                    done.set()

            thread = threading.Thread(target=run, name="hoptrace-tracing-flush", daemon=True)
            cur = _flush = (thread, done, ok)
            thread.start()
    return cur[1].wait(timeout_s) and cur[2][0]


def shutdown_tracing(timeout_s: float = 5.0) -> None:
    """Flush queued spans (bounded by ``timeout_s``) and stop exporting. The provider stays
    installed (it cannot be replaced); a later ``configure_tracing`` installs a new exporter."""
    state = _state
    if state is None:
        return
    with _lock:
        cur, state.switch.current = state.switch.current, None
        state.exporter_key = None
    if cur is not None:
        _shutdown_processor(cur, timeout_s)


def _dump_stats() -> None:
    """With ``HOPTRACE_EXPORT_STATS_DIR`` set, write ``export_stats()`` to
    ``<dir>/<service>-<pid>.json`` after every export (a killed process leaves its last counts;
    the chaos run compares them with the store). Never raises."""
    state = _state
    folder = state.stats_dir if state is not None else None
    if folder is None or state is None:
        return
    try:
        path = os.path.join(folder, f"{state.service_name}-{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"service": state.service_name, **export_stats()}, f)
        os.replace(path + ".tmp", path)
    except Exception:  # noqa: BLE001 - accounting must never break export
        log.debug("tracing: could not write export stats", exc_info=True)


def get_tracer() -> trace.Tracer:
    """The hoptrace tracer (a no-op one until tracing is configured); made once per provider
    (the SDK's get_tracer builds a new tracer and scope on every call)."""
    state = _state
    if state is not None:
        if state.tracer is None:
            state.tracer = state.provider.get_tracer(TRACER_NAME)
        return state.tracer
    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def correlation_context(correlation_id: str) -> Iterator[context.Context]:
    """Attach baggage ``hoptrace.correlation_id`` for the block: every span started inside gets
    the attribute, and Kafka/HTTP calls propagate it."""
    ctx = baggage.set_baggage(BAGGAGE_KEY, correlation_id)
    token = context.attach(ctx)
    try:
        yield ctx
    finally:
        context.detach(token)


def current_correlation_id() -> str | None:
    """The correlation id in the current baggage, if any."""
    value = baggage.get_baggage(BAGGAGE_KEY)
    return str(value) if value else None
