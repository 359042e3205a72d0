"""``hoptrace collector``: OTLP receivers (gRPC + HTTP), the write queue and writers, the stall
scanner, the alert dispatcher and (optionally) the Kafka span source, in one asyncio process.

Its database sessions are set up so that a replica that hangs cannot hold the others up for
long: the server ends a session idle inside a transaction for ``IDLE_IN_TRANSACTION`` (its row
locks go with it) and probes idle connections with TCP keepalives; a statement gets
``COMMAND_TIMEOUT``. ``/readyz`` answers 200 while the store answers, the write queue is below
its cap and the last span write succeeded (compose's healthcheck), ``/healthz`` while the process
does (liveness)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
import uvicorn
from starlette.routing import BaseRoute

from hoptrace.contract import PipelineSpec, load_spec, parse_duration
from hoptrace.readiness import mark_ready
from hoptrace.settings import Settings, get_settings

from . import api_http, metrics, otlp_grpc, otlp_http, schema
from .alerts import AlertDispatcher, Targets
from .decode import DecodeKeys
from .ingest import MAX_AHEAD, Ingestor, SpanWindow
from .kafka_source import KafkaSpanSource
from .spanqueue import SpanQueue
from .stalls import CauseFn, StallScanner, no_cause
from .writer import Writer, init_connection, run_writer

log = logging.getLogger("hoptrace.collector")

#: Server-side settings of the collector's sessions (see the module docstring).
IDLE_IN_TRANSACTION = 10_000  # ms
SERVER_SETTINGS = {
    "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION),
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}
#: Seconds a statement may take before the client gives up on it (and retries, for a writer).
COMMAND_TIMEOUT = 60.0
#: Seconds ``/readyz`` waits for the store.
READY_TIMEOUT = 2.0


class Collector:
    """One collector replica. ``await start()``, then ``grpc_port``/``http_port`` are bound."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        spec: PipelineSpec | None = None,
        cause_for: CauseFn | None = None,
        receivers: bool = True,
        extra_routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.settings = s = settings or get_settings()
        self.spec = spec or load_spec(s.pipeline)
        self.retention: timedelta = parse_duration(s.retention)
        self.cause_for = cause_for or no_cause
        self.receivers = receivers
        #: HTTP routes mounted beside the receiver's (the command line's redrive route)
        self.extra_routes = tuple(extra_routes)
        self.queue = SpanQueue(s.queue_max_spans)
        self.keys = DecodeKeys.for_spec(self.spec)
        self.window = SpanWindow(max_age=self.retention, max_ahead=MAX_AHEAD)
        self.ingestor = Ingestor(self.queue, s.ingest_token, self.window, self.keys)
        self.grpc_port = s.otlp_grpc_port
        self.http_port = s.otlp_http_port
        self.pool: asyncpg.Pool | None = None
        self.writer: Writer | None = None
        self.scanner: StallScanner | None = None
        self.dispatcher: AlertDispatcher | None = None
        self.kafka: KafkaSpanSource | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._bg: list[asyncio.Task[None]] = []
        self._grpc = None
        self._http: uvicorn.Server | None = None
        self.read_api: api_http.ReadApi | None = None

    async def start(self) -> None:
        s = self.settings
        conn = await asyncpg.connect(s.database_url)
        try:
            await schema.migrate(conn, self.retention)
        finally:
            await conn.close()
        self.pool = await asyncpg.create_pool(
            s.database_url,
            min_size=1,
            max_size=s.writers + 4,
            init=init_connection,
            server_settings=SERVER_SETTINGS,
            command_timeout=COMMAND_TIMEOUT,
        )
        self.writer = Writer(self.pool, self.spec, self.retention)
        for _ in range(s.writers):
            self._tasks.append(
                asyncio.create_task(run_writer(self.writer, self.queue, s.write_batch_spans))
            )
        self.scanner = StallScanner(
            s.database_url,
            self.pool,
            s.stall_scan_interval,
            self.cause_for,
            spec=self.spec,
            grace=s.stall_grace,
            behind=lambda: self.queue.behind(max(2.0, 2 * s.stall_scan_interval)),
        )
        self.dispatcher = AlertDispatcher(
            self.pool,
            Targets(s.alertmanager_url, s.alert_webhook_url, s.dashboard_url, s.jaeger_url),
            lambda: self.scanner is not None and self.scanner.is_leader,
            interval=min(1.0, s.stall_scan_interval),
        )
        self._bg += [
            asyncio.create_task(self.scanner.run()),
            asyncio.create_task(self.dispatcher.run()),
            asyncio.create_task(self._maintenance()),
        ]
        if s.span_topic:
            self.kafka = KafkaSpanSource(
                s.kafka_bootstrap,
                s.span_topic,
                s.span_group,
                self.queue,
                window=self.window,
                keys=self.keys,
                kafka=s,
            )
            self._bg.append(asyncio.create_task(self.kafka.run_forever()))
        if self.receivers:
            await self._start_receivers()

    async def _start_receivers(self) -> None:
        s = self.settings
        self._grpc, self.grpc_port = otlp_grpc.build_server(
            self.ingestor, s.bind_host, self.grpc_port, s.max_body_bytes
        )
        await self._grpc.start()
        app = otlp_http.build_app(
            self.ingestor, s.max_body_bytes, ready=self.ready, extra_routes=self.extra_routes
        )
        self.read_api = api_http.mount(app, s, self.spec, self.ingestor.authorized)
        config = uvicorn.Config(
            app,
            host=s.bind_host,
            port=self.http_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        self._http = uvicorn.Server(config)
        self._http.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._bg.append(asyncio.create_task(self._http.serve()))
        while not self._http.started:
            if self._bg[-1].done():
                self._bg[-1].result()
                raise RuntimeError("HTTP receiver did not start")
            await asyncio.sleep(0.01)
        if self.http_port == 0:
            self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    async def ready(self) -> tuple[bool, str]:
        """Readiness: the write queue is below its cap, the store answers and the last span
        write succeeded (a store that answers but refuses writes is not ready either)."""
        depth, cap = self.queue.depth, self.queue.max_spans
        if depth >= cap:
            return False, f"not ready: write queue at its cap ({depth}/{cap} spans)"
        if self.pool is None:
            return False, "not ready: not started"
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), READY_TIMEOUT)
        except (Exception, TimeoutError) as exc:
            return False, f"not ready: database unreachable ({type(exc).__name__})"
        if self.writer is not None and self.writer.last_error is not None:
            return False, f"not ready: the last span write failed ({self.writer.last_error})"
        return True, "ready"

    async def _maintenance(self) -> None:
        """Partitions ahead (every replica) and retention (the scan leader), hourly."""
        assert self.pool is not None
        while True:
            await asyncio.sleep(3600)
            try:
                async with self.pool.acquire() as conn:
                    await schema.migrate(conn, self.retention)
                    if self.scanner is not None and self.scanner.is_leader:
                        dropped = await schema.drop_expired(conn, self.retention)
                        if dropped:
                            log.info("retention: dropped %s", ", ".join(dropped))
                        purged = await schema.purge_expired(conn, self.retention)
                        if any(purged.values()):
                            log.info("retention: deleted %s", purged)
            except Exception as exc:
                log.warning("maintenance failed: %s", exc)

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every accepted span is written."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.queue.depth or (self.writer is not None and self.writer.inflight):
            if loop.time() > end:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        """Stop receiving, write everything accepted, then stop the rest."""
        if self._http is not None:
            self._http.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(grace=1)
        await self.drain()
        for t in self._bg + self._tasks:
            t.cancel()
        for t in self._bg + self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.scanner is not None:
            await self.scanner.release()
        if self.dispatcher is not None:
            await self.dispatcher.aclose()
        if self.read_api is not None:
            await self.read_api.aclose()
        if self.pool is not None:
            await self.pool.close()
        metrics.QUEUE_DEPTH.set(0)


def _cause_hook() -> CauseFn | None:
    """The diagnosis hook, ``hoptrace.collector.api.cause_for``, if present."""
    try:
        mod = importlib.import_module("hoptrace.collector.api")
    except ImportError:
        return None
    hook = getattr(mod, "cause_for", None)
    return hook if callable(hook) else None


async def _serve(extra_routes: Sequence[BaseRoute] = ()) -> None:
    hook = _cause_hook()
    collector = Collector(cause_for=hook, extra_routes=extra_routes)
    await collector.start()
    log.info(
        "collector listening: OTLP gRPC %s:%d, HTTP %s:%d",
        collector.settings.bind_host,
        collector.grpc_port,
        collector.settings.bind_host,
        collector.http_port,
    )
    mark_ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await collector.stop()
    if hook is not None:  # the Kafka and database clients the diagnosis opened on this loop
        await importlib.import_module("hoptrace.collector.api").close()


def main(extra_routes: Sequence[BaseRoute] = ()) -> None:
    """Run one replica until SIGINT/SIGTERM; ``extra_routes`` go on its HTTP port."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:  # uvloop when installed: less CPU per request
        import uvloop
    except ImportError:
        asyncio.run(_serve(extra_routes))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(extra_routes))
