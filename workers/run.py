"""`hoptrace worker NAME`: run one service of the reference pipeline with tracing, migrations,
readiness (``mark_ready`` once it listens / its consumer is assigned) and a clean exit 0 on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine

import asyncpg

from hoptrace.contract import PipelineSpec, SpecError, load_spec
from hoptrace.instrumentation.hop import HopHooks, HopOptions, HopRuntime
from hoptrace.instrumentation.producer import HopProducer
from hoptrace.instrumentation.tracing import configure_tracing, shutdown_tracing
from hoptrace.readiness import clear_ready, mark_ready
from hoptrace.settings import Settings, get_settings

from . import faults
from .schema import migrate

log = logging.getLogger("hoptrace.workers")

SERVICES = (
    "payment-service",
    "purchase-worker",
    "allocation-worker",
    "session-worker",
    "admin-service",
)
CRASH_EXIT_CODE = 17
READY_CHECK_S = 3.0
DEFAULT_CONSUMERS = 1  # per worker process: one consumer handles its partitions concurrently
#: Offsets are committed (after the spans of the records handled are exported) this often: each
#: commit forces a span export, so a short interval costs CPU; a kill redelivers at most this
#: much (a duplicate, never a second row).
COMMIT_INTERVAL_S = 1.0
#: Allocations (minus deallocations) of container objects between young-generation collections
#: (Python's default is 700).
GC_GEN0_THRESHOLD = 20_000
#: Records handled at once per consumer (by key: one correlation's records stay in order).
MAX_LANES = 16
#: Emits of concurrent records wait this long to share one produce request.
LINGER_MS = 2


def _url(explicit: str | None, host: str, port: int) -> str:
    return explicit.rstrip("/") if explicit else f"http://{host}:{port}"


async def _crash(_ctx: object) -> None:
    """Fault ``crash-after-write``: die like a killed process (no cleanup, no offset commit)."""
    os._exit(CRASH_EXIT_CODE)


async def _slow(_ctx: object) -> None:
    """Fault ``slow``: a delay before each record is handled (the consumer lags)."""
    await asyncio.sleep(faults.SLOW_DELAY_S)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool ``reset``: our services keep no session state (no LISTEN, SET or advisory locks),
    so skip asyncpg's default reset query: one round trip (and one span) less per request."""


def _pool(database_url: str, size: int) -> asyncpg.Pool:
    return asyncpg.create_pool(database_url, min_size=2, max_size=size, reset=_keep_session)


@contextlib.asynccontextmanager
async def _admin_service(
    settings: Settings, spec: PipelineSpec, fault: str | None
) -> AsyncIterator[asyncio.Task]:
    from .admin_service import build_app
    from .http import start_server, stop_server

    async with _pool(settings.database_url, 10) as pool:
        server, task = await start_server(
            build_app(pool, fault), settings.bind_host, settings.admin_service_port
        )
        try:
            yield task
        finally:
            await stop_server(server, task)


@contextlib.asynccontextmanager
async def _payment_service(
    settings: Settings, spec: PipelineSpec, fault: str | None
) -> AsyncIterator[asyncio.Task]:
    from .http import start_server, stop_server
    from .payment_service import PaymentService

    producer = HopProducer(settings.kafka_bootstrap, linger_ms=LINGER_MS)
    await producer.start()
    try:
        async with _pool(settings.database_url, 20) as pool:
            service = PaymentService(spec, pool, producer, fault)
            relay = asyncio.create_task(service.relay(), name="outbox-relay")
            server, task = await start_server(
                service.app(), settings.bind_host, settings.payment_service_port
            )
            try:
                yield task
            finally:
                await stop_server(server, task)
                service.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(relay, 10)
    finally:
        await producer.stop()


def _hooks(fault: str | None) -> HopHooks | None:
    if fault == faults.CRASH_AFTER_WRITE:
        return HopHooks(after_db_commit=_crash)
    if fault == faults.SLOW:
        return HopHooks(before_handle=_slow)
    return None


@contextlib.asynccontextmanager
async def _worker(
    settings: Settings, spec: PipelineSpec, name: str, fault: str | None
) -> AsyncIterator[asyncio.Task]:
    from . import allocation_worker, purchase_worker, session_worker
    from .events import validator

    step = spec.step_for_service(name)
    opts: dict[str, object] = {}
    allocator: allocation_worker.Allocator | None = None
    if name == "allocation-worker":
        base = _url(settings.admin_service_url, settings.bind_host, settings.admin_service_port)
        allocator = allocation_worker.Allocator(base, timeout_s=5.0)
        handler, consumes = allocator.handle, allocation_worker.CONSUMES
        opts["verify_effect"] = fault != faults.NO_VERIFY
        if fault == faults.WRONG_GROUP:
            # A misconfigured deployment: a new group starts at the end of the log, as Kafka
            # clients do by default, so records produced before it joined are never handled.
            opts["group"] = f"{step.group or name}{faults.WRONG_GROUP_SUFFIX}"
            opts["auto_offset_reset"] = "latest"
    elif name == "purchase-worker":
        handler, consumes = purchase_worker.handle, purchase_worker.CONSUMES
    else:
        handler, consumes = session_worker.handle, session_worker.CONSUMES
    consumers = settings.worker_consumers or min(DEFAULT_CONSUMERS, spec.partitions)
    producer = HopProducer(settings.kafka_bootstrap, linger_ms=LINGER_MS)
    await producer.start()
    runtimes = [
        HopRuntime(
            spec,
            step.id,
            handler,
            HopOptions(
                bootstrap=settings.kafka_bootstrap,
                database_url=settings.database_url,
                handle_signals=False,
                commit_interval_s=COMMIT_INTERVAL_S,
                max_lanes=MAX_LANES,
                **opts,  # type: ignore[arg-type]
            ),
            producer=producer,
            hooks=_hooks(fault),
            validate=validator(consumes),
        )
        for _ in range(consumers)
    ]
    tasks = [
        asyncio.create_task(rt.run(), name=f"{name}-runtime-{i}") for i, rt in enumerate(runtimes)
    ]
    try:
        if await _until_assigned(
            runtimes[0], tasks[0], settings.kafka_bootstrap, step.consumes or ""
        ):
            others = [asyncio.create_task(rt.ready.wait()) for rt in runtimes[1:]]
            if others:  # best effort: a topic with fewer partitions leaves some idle
                await asyncio.wait(others, timeout=READY_CHECK_S * 3)
        yield asyncio.create_task(_first_to_end(tasks), name=f"{name}-supervisor")
    finally:
        for rt in runtimes:
            await rt.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        if allocator is not None:
            await allocator.aclose()
        await producer.stop()


async def _first_to_end(tasks: list[asyncio.Task]) -> None:
    """Ends (raising its error) as soon as one consumer's runtime ends."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        task.result()


async def _until_assigned(
    runtime: HopRuntime, task: asyncio.Task, bootstrap: str, topic: str
) -> bool:
    """Wait until the consumer has partitions (True). If its topic does not exist, say so and
    count as ready anyway (False: it consumes nothing until `hoptrace topics ensure`)."""
    ready = asyncio.create_task(runtime.ready.wait())
    while True:
        await asyncio.wait(
            {ready, task}, timeout=READY_CHECK_S, return_when=asyncio.FIRST_COMPLETED
        )
        if task.done():
            ready.cancel()
            task.result()
            raise RuntimeError("the hop runtime stopped before it was ready")
        if ready.done():
            return True
        if await _topic_missing(bootstrap, topic):
            log.warning(
                "topic %s does not exist: consuming nothing until it is created "
                "(`hoptrace topics ensure`)",
                topic,
            )
            logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)  # 10 lines/s

            def appeared(_t: asyncio.Task) -> None:
                logging.getLogger("aiokafka.cluster").setLevel(logging.NOTSET)
                log.info("topic %s exists now; partitions assigned", topic)

            ready.add_done_callback(appeared)
            return False


async def _topic_missing(bootstrap: str, topic: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), 10)
        return topic not in set(await admin.list_topics())
    except Exception:  # Kafka unreachable: not a verdict on the topic
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _service(
    name: str, settings: Settings, spec: PipelineSpec, fault: str | None
) -> contextlib.AbstractAsyncContextManager[asyncio.Task]:
    if name == "admin-service":
        return _admin_service(settings, spec, fault)
    if name == "payment-service":
        return _payment_service(settings, spec, fault)
    return _worker(settings, spec, name, fault)


async def serve(
    name: str, fault: str | None, settings: Settings, on_ready: Callable[[], None] = mark_ready
) -> int:
    """Run ``name`` until SIGTERM/SIGINT (exit code 0) or until it fails (1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    spec = load_spec(settings.pipeline)
    await migrate(settings.database_url)
    async with _service(name, settings, spec, fault) as task:
        _tune_gc()
        on_ready()
        log.info("%s ready%s", name, f" (fault {fault})" if fault else "")
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({stopper, task}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            stopper.cancel()
            exc = task.exception() if not task.cancelled() else None
            log.error("%s stopped unexpectedly: %r", name, exc)
            return 1
    log.info("%s stopped", name)
    return 0


def _tune_gc() -> None:
    """Less CPU in the garbage collector: what exists once the service is up (modules, pools,
    clients) lives as long as the process, so full collections stop scanning it (``freeze``);
    the young generation is collected less often (records make many short-lived objects, freed
    by reference counting anyway)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


def _run(coro: Coroutine[object, object, int]) -> int:
    """Run on uvloop when it is installed (less CPU per record), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(name: str, fault: str | None = None) -> None:
    """Entry point of `hoptrace worker NAME [--fault FAULT]`."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO ("HTTP Request: POST ..."): one log line per record
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if name not in SERVICES:
        print(f"hoptrace: unknown service {name!r}; one of: {', '.join(SERVICES)}", file=sys.stderr)
        sys.exit(2)
    try:
        fault = faults.validate_fault(name, fault)
    except ValueError as exc:
        print(f"hoptrace: {exc}", file=sys.stderr)
        sys.exit(2)
    settings = get_settings()
    configure_tracing(name)
    code = 1
    try:
        code = _run(serve(name, fault, settings))
    except SpecError as exc:
        print(f"hoptrace: {exc}", file=sys.stderr)
        code = 2
    except (OSError, asyncpg.PostgresError) as exc:
        log.error("%s could not start: %s", name, exc)
        code = 1
    finally:
        clear_ready()
        shutdown_tracing(5.0)
    sys.exit(code)
