"""A real worker process for the SIGTERM test: one hop, spans batched with a long delay (so only
the shutdown flush can deliver them), a handler slow enough to be caught mid-record."""

from __future__ import annotations

import asyncio
import os
import sys

from hoptrace.instrumentation import (
    Emit,
    HopContext,
    HopOptions,
    HopRuntime,
    configure_tracing,
    load_spec,
    shutdown_tracing,
)


async def main() -> None:
    configure_tracing(
        "sigterm-worker",
        endpoint=os.environ["TEST_OTLP_ENDPOINT"],
        protocol="grpc",
        schedule_delay_millis=60_000,
    )
    spec = load_spec(os.environ["HOPTRACE_PIPELINE"])

    async def purchase(ctx: HopContext) -> Emit:
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases VALUES ($1, 1)", ctx.correlation_id
        )
        print("HANDLING", ctx.correlation_id, flush=True)
        await asyncio.sleep(float(os.environ.get("TEST_HANDLER_SLEEP", "1.5")))
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    runtime = HopRuntime(
        spec,
        "purchase.created",
        purchase,
        HopOptions(
            bootstrap=os.environ["HOPTRACE_KAFKA_BOOTSTRAP"],
            database_url=os.environ["HOPTRACE_DATABASE_URL"],
        ),
    )
    task = asyncio.create_task(runtime.run())
    await runtime.ready.wait()
    print("READY", flush=True)
    await task
    shutdown_tracing(timeout_s=5.0)
    print("EXITED", runtime.stats, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
