from __future__ import annotations

import httpx

from hoptrace.collector import store
from hoptrace.collector.service import Collector

from ..support import wait_for
from .helpers import request, step_span


async def test_http_protobuf_span_lands(collector: Collector, pool) -> None:
    svc, span = step_span("pay-1", 0)
    body = request([(svc, span)]).SerializeToString()
    async with httpx.AsyncClient() as c:
        r = await c.post(
            f"http://127.0.0.1:{collector.http_port}/v1/traces",
            content=body,
            headers={"content-type": "application/x-protobuf"},
        )
    assert r.status_code == 200
    spans = await wait_for(lambda: store.spans_for_correlation(pool, "pay-1"), what="span stored")
    assert spans[0].step == "payment.confirmed"
    corr = await store.correlation(pool, "pay-1")
    assert (
        corr is not None
        and corr.last_step == "payment.confirmed"
        and corr.next_step == "purchase.created"
    )
