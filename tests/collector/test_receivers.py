"""OTLP receivers: real OTel SDK exporters, and the answers to bad input."""

from __future__ import annotations

import asyncio
import gzip
import os
import time

import grpc
import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from hoptrace.collector import store
from hoptrace.collector.service import Collector
from hoptrace.collector.writer import run_writer

from ..support import wait_for
from .helpers import request, step_span

PB = {"content-type": "application/x-protobuf"}
#: A recent start time (the collector refuses spans older than its retention).
NOW_NS = (time.time_ns() // 10**9 - 3600) * 10**9


def _url(c: Collector) -> str:
    return f"http://127.0.0.1:{c.http_port}/v1/traces"


async def _emit(exporter: SpanExporter, cid: str, n: int = 3) -> SpanExportResult:
    """Spans of one correlation through a real SDK pipeline (BatchSpanProcessor -> exporter)."""
    results: list[SpanExportResult] = []

    class Recording(SpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            r = exporter.export(spans)
            results.append(r)
            return r

        def shutdown(self) -> None:
            exporter.shutdown()

    provider = TracerProvider(resource=Resource.create({"service.name": "payment-service"}))
    provider.add_span_processor(BatchSpanProcessor(Recording()))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("payment.confirmed") as root:
        root.set_attributes(
            {
                "hoptrace.correlation_id": cid,
                "hoptrace.pipeline": "payments",
                "hoptrace.step": "payment.confirmed",
                "hoptrace.step.outcome": "ok",
            }
        )
        for i in range(n - 1):
            with tracer.start_as_current_span(f"child-{i}") as child:
                child.set_attribute("hoptrace.correlation_id", cid)
                child.add_event("did-something", {"i": i})
    await asyncio.to_thread(provider.force_flush)
    await asyncio.to_thread(provider.shutdown)
    return results[0] if results else SpanExportResult.FAILURE


async def test_sdk_grpc_exporter_spans_queryable(collector: Collector, pool) -> None:
    exp = GrpcExporter(endpoint=f"127.0.0.1:{collector.grpc_port}", insecure=True)
    assert await _emit(exp, "grpc-cid", 3) == SpanExportResult.SUCCESS
    spans = await wait_for(lambda: _count(pool, "grpc-cid", 3), what="3 spans of grpc-cid stored")
    root = next(s for s in spans if s.name == "payment.confirmed")
    child = next(s for s in spans if s.name == "child-0")
    assert root.service == "payment-service" and root.step == "payment.confirmed"
    assert child.parent_span_id == root.span_id and child.trace_id == root.trace_id
    assert child.events[0]["name"] == "did-something" and child.events[0]["attributes"] == {"i": 0}
    assert len(root.trace_id) == 32 and len(root.span_id) == 16
    assert (await store.correlation(pool, "grpc-cid")).last_step == "payment.confirmed"
    by_trace = await store.spans_for_trace(pool, root.trace_id)
    assert {s.span_id for s in by_trace} == {s.span_id for s in spans}


async def test_sdk_http_exporter_gzip_spans_queryable(collector: Collector, pool) -> None:
    exp = HttpExporter(endpoint=_url(collector), compression=Compression.Gzip)
    assert await _emit(exp, "http-cid", 4) == SpanExportResult.SUCCESS
    spans = await wait_for(lambda: _count(pool, "http-cid", 4), what="4 spans stored")
    assert {s.correlation_id for s in spans} == {"http-cid"}


async def _count(pool, cid: str, n: int):  # type: ignore[no-untyped-def]
    spans = await store.spans_for_correlation(pool, cid)
    return spans if len(spans) == n else None


def _otlp_json(cid: str, trace_id: str, span_id: str) -> dict:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "purchase-worker"}}
                    ]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "t"},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "name": "purchase.created",
                                "kind": 5,
                                "startTimeUnixNano": str(NOW_NS),
                                "endTimeUnixNano": str(NOW_NS + 250_000_000),
                                "attributes": [
                                    {
                                        "key": "hoptrace.correlation_id",
                                        "value": {"stringValue": cid},
                                    },
                                    {
                                        "key": "hoptrace.step",
                                        "value": {"stringValue": "purchase.created"},
                                    },
                                    {"key": "messaging.kafka.offset", "value": {"intValue": "42"}},
                                ],
                                "status": {"code": 1},
                            },
                            {"traceId": "", "spanId": "", "name": "no-ids"},
                        ],
                    }
                ],
            }
        ]
    }


async def test_otlp_json_partial_success_and_hex_ids(collector: Collector, pool) -> None:
    tid, sid = os.urandom(16).hex(), os.urandom(8).hex()
    async with httpx.AsyncClient() as c:
        r = await c.post(_url(collector), json=_otlp_json("json-cid", tid, sid))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["partialSuccess"]["rejectedSpans"] == "1"
    spans = await wait_for(lambda: store.spans_for_correlation(pool, "json-cid"), what="json span")
    assert spans[0].trace_id == tid and spans[0].span_id == sid
    assert spans[0].attributes["messaging.kafka.offset"] == 42
    assert spans[0].duration_us == 250_000 and spans[0].kind == 5


async def test_bad_input_codes_and_keeps_serving(make_collector) -> None:  # type: ignore[no-untyped-def]
    c = await make_collector(max_body_bytes=64 * 1024)
    url = _url(c)
    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024))  # 50 MiB inflated, ~50 KiB on the wire
    async with httpx.AsyncClient() as h:
        cases = [
            (b"\xff\xff\xff\xff garbage", PB, 400),
            (b"{not json", {"content-type": "application/json"}, 400),
            (
                b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
                {"content-type": "application/json"},
                400,
            ),
            (b"[1,2]", {"content-type": "application/json"}, 400),
            (b"hello", {"content-type": "text/plain"}, 415),
            (b"x", {**PB, "content-encoding": "br"}, 415),
            (b"\0" * (65 * 1024), PB, 413),
            (bomb, {**PB, "content-encoding": "gzip"}, 413),
            (b"not gzip at all", {**PB, "content-encoding": "gzip"}, 400),
        ]
        for body, headers, code in cases:
            r = await h.post(url, content=body, headers=headers)
            assert r.status_code == code, (body[:20], headers, r.status_code, r.text)

        # chunked body without Content-Length over the cap
        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(100):
                yield b"\0" * 1024

        r = await h.post(url, content=chunks(), headers=PB)
        assert r.status_code == 413
        r = await h.get(f"http://127.0.0.1:{c.http_port}/v1/traces")
        assert r.status_code == 405
        # still serving
        svc, span = step_span("after-bad", 0)
        r = await h.post(url, content=request([(svc, span)]).SerializeToString(), headers=PB)
        assert r.status_code == 200
        assert ExportTraceServiceResponse.FromString(r.content).partial_success.rejected_spans == 0
        assert (await h.get(f"http://127.0.0.1:{c.http_port}/healthz")).status_code == 200
        m = await h.get(f"http://127.0.0.1:{c.http_port}/metrics")
        assert 'hoptrace_spans_dropped_total{reason="too_large"}' in m.text
        assert "hoptrace_queue_depth" in m.text and "hoptrace_write_batch_seconds_bucket" in m.text


async def test_grpc_malformed_is_invalid_argument(collector: Collector) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"\xff\xff\xff\xff garbage")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        svc, span = step_span("grpc-ok", 0)
        ok = await call(request([(svc, span)]).SerializeToString())
        assert ExportTraceServiceResponse.FromString(ok).partial_success.rejected_spans == 0


async def test_token_enforced_http_and_grpc(make_collector, db_url) -> None:  # type: ignore[no-untyped-def]
    c = await make_collector(ingest_token="s3cret")
    body = request([step_span("tok-bad", 0)]).SerializeToString()
    async with httpx.AsyncClient() as h:
        assert (await h.post(_url(c), content=body, headers=PB)).status_code == 401
        r = await h.post(_url(c), content=body, headers={**PB, "authorization": "Bearer nope"})
        assert r.status_code == 401
        good = request([step_span("tok-good", 0)]).SerializeToString()
        r = await h.post(_url(c), content=good, headers={**PB, "authorization": "Bearer s3cret"})
        assert r.status_code == 200
    async with grpc.aio.insecure_channel(f"127.0.0.1:{c.grpc_port}") as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(body)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good2 = request([step_span("tok-good-grpc", 0)]).SerializeToString()
        await call(good2, metadata=(("authorization", "Bearer s3cret"),))
    exp = GrpcExporter(
        endpoint=f"127.0.0.1:{c.grpc_port}",
        insecure=True,
        headers={"authorization": "Bearer s3cret"},
    )
    assert await _emit(exp, "tok-sdk", 1) == SpanExportResult.SUCCESS
    assert await c.drain()
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        stored = {r[0] for r in await conn.fetch("SELECT DISTINCT correlation_id FROM spans")}
    finally:
        await conn.close()
    assert stored == {"tok-good", "tok-good-grpc", "tok-sdk"}


async def test_backpressure_503_retry_after_then_nothing_lost(make_collector, pool_for) -> None:  # type: ignore[no-untyped-def]
    c = await make_collector(writers=0, queue_max_spans=2)
    first = request([step_span("bp-1", 0), step_span("bp-1", 0)[0:2]]).SerializeToString()
    second = request([step_span("bp-2", 0)]).SerializeToString()
    async with httpx.AsyncClient() as h:
        assert (await h.post(_url(c), content=first, headers=PB)).status_code == 200
        r = await h.post(_url(c), content=second, headers=PB)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{c.grpc_port}") as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(second)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "google.rpc.retryinfo-bin" in dict(err.value.trailing_metadata())
    # a writer comes back: everything accepted lands
    assert c.writer is not None
    c._tasks.append(asyncio.create_task(run_writer(c.writer, c.queue, 100)))
    pool = await pool_for()
    spans = await wait_for(lambda: store.spans_for_correlation(pool, "bp-1"), what="bp-1 spans")
    assert len(spans) == 2
    assert await store.spans_for_correlation(pool, "bp-2") == []


@pytest.fixture
async def pool_for(db_url):  # type: ignore[no-untyped-def]
    import asyncpg

    pools = []

    async def make():  # type: ignore[no-untyped-def]
        p = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        pools.append(p)
        return p

    yield make
    for p in pools:
        await p.close()
