"""The differential test's hops, run in a process of their own (the tracer provider and the
library instrumentations are set once per process, so each side of the switch gets one):
two payments through a producer-only step and two hops (real Kafka, real PostgreSQL), exported
over OTLP/gRPC to the test's receiver.

purchase.created writes its row and emits; trainer.allocated calls the stand-in HTTP service
through ``HttpClient``: the first payment's first call answers 503 (a retried failure), then it
writes its row and emits; the second payment's call answers 400 (poison: dead-lettered).
Environment: HOPTRACE_PIPELINE, HOPTRACE_KAFKA_BOOTSTRAP, HOPTRACE_DATABASE_URL,
TEST_OTLP_ENDPOINT, TEST_HTTP_URL, HOPTRACE_ACCEL (the side of the switch)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

from hoptrace.instrumentation import (
    Emit,
    Envelope,
    HopContext,
    HopOptions,
    HopProducer,
    HopRuntime,
    HttpClient,
    PoisonRecord,
    RetryableError,
    configure_tracing,
    load_spec,
    shutdown_tracing,
    step_span,
)
from tests.support import wait_for

#: The two payments (fixed ids and event ids: both runs give the spans the same attributes).
PAYMENTS = {"diff-ok-1": "e-ok-1", "diff-bad-1": "e-bad-1"}
OCCURRED = datetime(2026, 1, 1, tzinfo=UTC)


async def _handled(rt: HopRuntime, tasks: list[asyncio.Task], n: int) -> bool:
    for task in tasks:
        if task.done():
            task.result()  # a runtime that ended raises here
    return rt.stats["ok"] + rt.stats["error"] >= n


async def main() -> None:
    configure_tracing(
        "accel-diff",
        endpoint=os.environ["TEST_OTLP_ENDPOINT"],
        protocol="grpc",
        schedule_delay_millis=50,
    )
    spec = load_spec(os.environ["HOPTRACE_PIPELINE"])
    bootstrap = os.environ["HOPTRACE_KAFKA_BOOTSTRAP"]
    db_url = os.environ["HOPTRACE_DATABASE_URL"]
    http = HttpClient(os.environ["TEST_HTTP_URL"], timeout=5.0)

    async def purchase(ctx: HopContext) -> Emit:
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, $2)", ctx.correlation_id, 3
        )
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    async def allocate(ctx: HopContext) -> Emit:
        resp = await http.post("/allocations", json={"correlation_id": ctx.correlation_id})
        if resp.status_code >= 500:
            raise RetryableError(f"answered {resp.status_code}")
        if resp.status_code >= 400:
            raise PoisonRecord(f"rejected ({resp.status_code})")
        trainer = resp.json()["trainer"]
        await ctx.conn.execute(
            "INSERT INTO trainer_allocations VALUES ($1, $2)", ctx.correlation_id, trainer
        )
        return Emit("TRAINER_ALLOCATED", {"payment_id": ctx.correlation_id, "trainer": trainer})

    def options(**kw: object) -> HopOptions:
        return HopOptions(
            bootstrap=bootstrap,
            database_url=db_url,
            handle_signals=False,
            backoff_s=0.05,
            max_lanes=1,  # one record at a time: the same order, so the same offsets
            **kw,  # type: ignore[arg-type]
        )

    hop1 = HopRuntime(spec, "purchase.created", purchase, options())
    hop2 = HopRuntime(spec, "trainer.allocated", allocate, options())
    tasks = [asyncio.create_task(rt.run()) for rt in (hop1, hop2)]
    try:
        await asyncio.wait_for(asyncio.gather(hop1.ready.wait(), hop2.ready.wait()), 60)
        first = spec.step("payment.confirmed")
        async with HopProducer(bootstrap) as producer:
            for n, (cid, event_id) in enumerate(PAYMENTS.items(), start=1):
                envelope = Envelope(
                    event_id=event_id,
                    type="PURCHASE_CONFIRMED",
                    version=1,
                    correlation_id=cid,
                    occurred_at=OCCURRED,
                    payload={"payment_id": cid, "amount": 3},
                )
                with step_span(spec, first.id, cid):
                    await producer.emit(first.emits, envelope)
                # one payment at a time: the same order, so the same offsets in both runs
                await wait_for(lambda n=n: _handled(hop2, tasks, n), timeout=60, what="hop 2")
    finally:
        for rt in (hop1, hop2):
            await rt.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await http.aclose()
        shutdown_tracing(timeout_s=10.0)
    print("stats", hop1.stats, hop2.stats, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
