"""`hoptrace worker NAME`: run one service of the reference pipeline (:mod:`.registry`) with
tracing, migrations, its fault switch applied as hooks, readiness (``mark_ready`` once it
listens / its consumer is assigned) and a clean exit 0 on SIGTERM/SIGINT. Its Kafka clients
connect with the security settings (``HOPTRACE_KAFKA_*``, :mod:`hoptrace.kafka`); a broker that
refuses them stops it with one line saying why (exit 1)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError

from hoptrace.contract import PipelineSpec, SpecError, load_spec
from hoptrace.instrumentation.hop import HopHooks, HopOptions, HopRuntime
from hoptrace.instrumentation.producer import HopProducer
from hoptrace.instrumentation.tracing import configure_tracing, shutdown_tracing
from hoptrace.kafka import KafkaConfigError, client_options, explain
from hoptrace.readiness import clear_ready, mark_ready
from hoptrace.settings import KafkaSettings, WorkerSettings, get_worker_settings

from . import registry
from .events import validator
from .http import start_server, stop_server
from .schema import migrate
from .service import Fault, HopSetup, HopWorker, HttpService, Service
from .tuning import (
    COMMIT_INTERVAL_S,
    DEFAULT_CONSUMERS,
    GC_GEN0_THRESHOLD,
    LINGER_MS,
    MAX_LANES,
    READY_CHECK_S,
)

log = logging.getLogger("hoptrace.workers")


@contextlib.asynccontextmanager
async def _http_service(
    service: HttpService[Any],
    fault: Fault[Any] | None,
    settings: WorkerSettings,
    spec: PipelineSpec,
) -> AsyncIterator[asyncio.Task]:
    port = service.port(settings)
    assert port is not None
    async with service.app(settings, spec, service.hooks_for(fault)) as app:
        server, task = await start_server(app, settings.bind_host, port)
        try:
            yield task
        finally:
            await stop_server(server, task)


@contextlib.asynccontextmanager
async def _hop_worker(
    service: HopWorker, fault: Fault[HopSetup] | None, settings: WorkerSettings, spec: PipelineSpec
) -> AsyncIterator[asyncio.Task]:
    setup = HopSetup(
        step=spec.step_for_service(service.name),
        options=HopOptions(
            bootstrap=settings.kafka_bootstrap,
            database_url=settings.database_url,
            handle_signals=False,
            commit_interval_s=COMMIT_INTERVAL_S,
            max_lanes=MAX_LANES,
            consumer_opts=client_options(settings),
        ),
        hooks=HopHooks(),
    )
    if fault is not None:
        setup = fault.apply(setup)
    consumers = settings.worker_consumers or min(DEFAULT_CONSUMERS, spec.partitions)
    async with (
        HopProducer(
            settings.kafka_bootstrap, linger_ms=LINGER_MS, **client_options(settings)
        ) as producer,
        service.handler(settings) as handler,
    ):
        runtimes = [
            HopRuntime(
                spec,
                setup.step.id,
                handler,
                setup.options,
                producer=producer,
                hooks=setup.hooks,
                validate=validator(service.consumes),
            )
            for _ in range(consumers)
        ]
        tasks = [
            asyncio.create_task(rt.run(), name=f"{service.name}-runtime-{i}")
            for i, rt in enumerate(runtimes)
        ]
        try:
            topic = setup.step.consumes or ""
            if await _until_assigned(runtimes[0], tasks[0], settings, topic):
                others = [asyncio.create_task(rt.ready.wait()) for rt in runtimes[1:]]
                if others:  # best effort: a topic with fewer partitions leaves some idle
                    await asyncio.wait(others, timeout=READY_CHECK_S * 3)
            yield asyncio.create_task(_first_to_end(tasks), name=f"{service.name}-supervisor")
        finally:
            for rt in runtimes:
                await rt.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)


async def _first_to_end(tasks: list[asyncio.Task]) -> None:
    """Ends (raising its error) as soon as one consumer's runtime ends."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        task.result()


async def _until_assigned(
    runtime: HopRuntime, task: asyncio.Task, settings: KafkaSettings, topic: str
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
        if await _topic_missing(settings, topic):
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


async def _topic_missing(settings: KafkaSettings, topic: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=5000,
        **client_options(settings),
    )
    try:
        await asyncio.wait_for(admin.start(), 10)
        return topic not in set(await admin.list_topics())
    except Exception:  # Kafka unreachable: not a verdict on the topic
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _running(
    service: Service[Any], fault: Fault[Any] | None, settings: WorkerSettings, spec: PipelineSpec
) -> contextlib.AbstractAsyncContextManager[asyncio.Task]:
    """The service running (by its kind); the task ends when the service stops by itself."""
    match service:
        case HopWorker():
            return _hop_worker(service, fault, settings, spec)
        case HttpService():
            return _http_service(service, fault, settings, spec)
    raise TypeError(f"{service.name}: no runner for a {service.kind}")


async def serve(
    service: Service[Any],
    fault: Fault[Any] | None,
    settings: WorkerSettings,
    on_ready: Callable[[], None] = mark_ready,
) -> int:
    """Run ``service`` until SIGTERM/SIGINT (exit code 0) or until it fails (1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    spec = load_spec(settings.pipeline)
    await migrate(settings.database_url)
    async with _running(service, fault, settings, spec) as task:
        _tune_gc()
        on_ready()
        log.info("%s ready%s", service.name, f" (fault {fault.name})" if fault else "")
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({stopper, task}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            stopper.cancel()
            exc = task.exception() if not task.cancelled() else None
            log.error("%s stopped unexpectedly: %r", service.name, exc)
            return 1
    log.info("%s stopped", service.name)
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
    """Entry point of `hoptrace worker NAME [--fault FAULT]` (no ``--fault``:
    ``HOPTRACE_FAULT``)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO ("HTTP Request: POST ..."): one log line per record
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = get_worker_settings()
    try:
        service = registry.service(name)
        chosen = service.fault(fault or settings.fault)
    except ValueError as exc:
        print(f"hoptrace: {exc}", file=sys.stderr)
        sys.exit(2)
    settings = settings.model_copy(update={"fault": chosen.name if chosen else None})
    configure_tracing(name)
    code = 1
    try:
        code = _run(serve(service, chosen, settings))
    except (SpecError, KafkaConfigError) as exc:
        print(f"hoptrace: {exc}", file=sys.stderr)
        code = 2
    except KafkaError as exc:  # e.g. the broker refused the SASL login: say so, in one line
        log.error("%s could not start: %s", name, asyncio.run(explain(exc, settings)))
        code = 1
    except (OSError, asyncpg.PostgresError) as exc:
        log.error("%s could not start: %s", name, exc)
        code = 1
    finally:
        clear_ready()
        shutdown_tracing(5.0)
    sys.exit(code)
