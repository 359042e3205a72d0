"""The store stalls or drops connections: receivers push back (503), nothing accepted is lost."""

from __future__ import annotations

import asyncpg
import grpc
import httpx
import pytest

from ..support import wait_for
from .helpers import request, step_span

PB = {"content-type": "application/x-protobuf"}


async def test_blocked_store_backpressure_then_no_loss(make_collector, db_url: str) -> None:  # type: ignore[no-untyped-def]
    c = await make_collector(queue_max_spans=300, write_batch_spans=100)
    url = f"http://127.0.0.1:{c.http_port}/v1/traces"
    admin = await asyncpg.connect(db_url)
    accepted = refused = 0
    try:
        tr = admin.transaction()
        await tr.start()
        await admin.execute("LOCK TABLE spans IN ACCESS EXCLUSIVE MODE")  # writers block on INSERT
        async with httpx.AsyncClient() as h:
            for k in range(40):
                body = request([step_span(f"out-{k}", 0) for _ in range(50)]).SerializeToString()
                r = await h.post(url, content=body, headers=PB)
                if r.status_code == 200:
                    accepted += 50
                else:
                    assert r.status_code == 503 and r.headers["retry-after"]
                    refused += 1
        assert refused > 0 and accepted > 0
        await tr.rollback()  # the store is back
        # its connections are dropped too: the writer reconnects and retries
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        async with httpx.AsyncClient() as h:
            body = request([step_span("after-kill", 0)]).SerializeToString()
            r = await wait_for(
                lambda: _post_ok(h, url, body), timeout=20, what="accepted after kill"
            )
        accepted += 1

        async def all_stored():  # type: ignore[no-untyped-def]
            return await admin.fetchval("SELECT count(*) FROM spans") == accepted

        await wait_for(all_stored, timeout=30, what=f"{accepted} accepted spans stored")
    finally:
        await admin.close()


async def _post_ok(h: httpx.AsyncClient, url: str, body: bytes) -> bool:
    r = await h.post(url, content=body, headers=PB)
    return r.status_code == 200


async def test_grpc_over_size_cap_is_resource_exhausted(make_collector) -> None:  # type: ignore[no-untyped-def]
    c = await make_collector(max_body_bytes=2048)
    big = request([step_span("big", 0) for _ in range(40)]).SerializeToString()
    assert len(big) > 2048
    async with grpc.aio.insecure_channel(f"127.0.0.1:{c.grpc_port}") as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(big)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await call(request([step_span("small", 0)]).SerializeToString())  # still serving
