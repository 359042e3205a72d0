"""The caching asyncpg instrumentation makes the same spans as the library's (real Postgres):
same names, kinds, attributes and error status, for several statements and an error."""

from __future__ import annotations

import asyncpg
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hoptrace.instrumentation._accel import Speedup
from hoptrace.instrumentation._accel.asyncpg_spans import CachingAsyncPGInstrumentor

from .helpers import accel_only, plain_process

STATEMENTS = [
    ("execute", "CREATE TEMP TABLE t (a text PRIMARY KEY)"),
    ("execute", "/* comment */ INSERT INTO t VALUES ($1)", "x"),
    ("fetchval", "SELECT count(*) FROM t WHERE a = $1", "x"),
    ("fetchrow", "SELECT a FROM t WHERE a = $1", "x"),
    ("fetch", "  SELECT a FROM t"),
    ("execute", "INSERT INTO t VALUES ($1)", "x"),  # unique violation: an error span
]


async def _run(db_url: str, provider: TracerProvider) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        with provider.get_tracer("test").start_as_current_span("parent"):
            for method, *args in STATEMENTS:
                try:
                    await getattr(conn, method)(*args)
                except asyncpg.UniqueViolationError:
                    pass
    finally:
        await conn.close()


def _shape(exporter: InMemorySpanExporter) -> list[tuple]:
    return [
        (
            s.name,
            s.kind,
            dict(s.attributes),
            s.status.status_code,
            s.status.description,
            s.parent.span_id == parent.context.span_id,
            [
                (e.name, e.attributes.get("exception.type"), e.attributes.get("exception.message"))
                for e in s.events
            ],
        )
        for spans in [exporter.get_finished_spans()]
        for parent in [next(p for p in spans if p.name == "parent")]
        for s in spans
        if s.name != "parent"
    ]


async def test_same_spans_as_the_library(db_url: str) -> None:
    # whatever configure_tracing installed earlier in this process steps aside, and is back after
    installed = [i for i in (AsyncPGInstrumentor(), CachingAsyncPGInstrumentor())]
    installed = [i for i in installed if i.is_instrumented_by_opentelemetry]
    for other in installed:
        other.uninstrument()
    results = []
    try:
        for cls in (AsyncPGInstrumentor, CachingAsyncPGInstrumentor, CachingAsyncPGInstrumentor):
            exporter = InMemorySpanExporter()
            provider = TracerProvider(resource=Resource.create({"service.name": "pg-test"}))
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            inst = cls()
            assert type(inst) is cls
            inst.instrument(tracer_provider=provider)
            try:
                await _run(db_url, provider)
            finally:
                inst.uninstrument()
            results.append(_shape(exporter))
    finally:
        for other in installed:
            other.instrument(tracer_provider=trace.get_tracer_provider())
    library, first, cached = results
    assert len(library) == len(STATEMENTS)
    assert library[1][0] == "INSERT" and library[-1][3] is trace.StatusCode.ERROR
    assert library[-1][6][0][1].endswith("UniqueViolationError") and all(s[5] for s in library)
    assert first == library
    assert cached == library  # the second run reuses the cached name/attributes
    assert CachingAsyncPGInstrumentor._span_info


@accel_only(Speedup.ASYNCPG_SPANS)
def test_configure_tracing_installs_the_caching_instrumentor(spans) -> None:
    assert CachingAsyncPGInstrumentor().is_instrumented_by_opentelemetry
    assert not AsyncPGInstrumentor().is_instrumented_by_opentelemetry  # never both: one span


def test_without_the_speedup_configure_tracing_installs_the_stock_instrumentor() -> None:
    plain_process(
        "from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor\n"
        "from hoptrace.instrumentation._accel.asyncpg_spans import CachingAsyncPGInstrumentor\n"
        "assert AsyncPGInstrumentor().is_instrumented_by_opentelemetry\n"
        "assert not CachingAsyncPGInstrumentor().is_instrumented_by_opentelemetry"
    )
