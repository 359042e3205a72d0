"""payment-service: ``POST /payments`` writes a succeeded payment and an outbox row in one
transaction; the outbox relay emits PURCHASE_CONFIRMED (step ``payment.confirmed``) and marks the
row sent, so every committed payment is emitted at least once, even across a crash.

A client that may retry sends an ``Idempotency-Key`` header: a request with a key already used
for the same payment (student, course, amount) answers with that first payment (201, header
``Idempotent-Replayed: true``), however many retries race; a key used for another payment is
refused (422). The relay marks a row sent only once its step span is exported (a SIGKILL
before that re-sends the row instead of losing the span; while the collector is down the row
waits unsent, not sent again by this process), and backs off (doubling to
:data:`RELAY_MAX_BACKOFF_S`) while a pass sends nothing, e.g. while Kafka is down, instead of
retrying its batch in a tight loop.

Its fault switches (:data:`SERVICE`) are :class:`PaymentHooks` of the write path: ``skip-emit``
(the payment is written, the event never emitted) and ``crash-after-write`` (the process exits
once the payment committed; the relay of the next start emits it)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import asyncpg
from opentelemetry import context, propagate, trace
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from hoptrace.contract import PipelineSpec, parse_duration
from hoptrace.contract.conventions import ATTR_CORRELATION_ID
from hoptrace.instrumentation.envelope import Envelope
from hoptrace.instrumentation.producer import HopProducer, step_span
from hoptrace.instrumentation.tracing import correlation_context, flush_tracing
from hoptrace.settings import WorkerSettings

from . import db, faults
from .events import PURCHASE_CONFIRMED, PurchaseConfirmedV1, new_event
from .http import BadRequest, error, instrumented, parse_body
from .service import Fault, HttpService
from .tuning import LINGER_MS

log = logging.getLogger("hoptrace.workers.payment_service")

NAME = "payment-service"
RELAY_BATCH = 500
RELAY_POLL_S = 0.5
#: The relay's longest wait while its rows keep failing (it starts at RELAY_POLL_S, doubling).
RELAY_MAX_BACKOFF_S = 5.0
#: How long a pass waits for its step spans to be exported before it marks its rows sent.
RELAY_FLUSH_S = 5.0
#: Sent outbox rows older than the retention (``HOPTRACE_RETENTION``) are purged this often, in
#: batches; unsent rows are never purged.
OUTBOX_PURGE_S = 3600.0
OUTBOX_PURGE_BATCH = 5000
_PURGE_SENT = """
DELETE FROM payment_outbox WHERE id = ANY(ARRAY(
    SELECT id FROM payment_outbox
    WHERE sent_at IS NOT NULL AND sent_at < now() - $1::interval
    LIMIT $2
))
"""


async def purge_sent(pool: asyncpg.Pool, older_than: timedelta) -> int:
    """Delete outbox rows sent longer than ``older_than`` ago, in batches; returns how many."""
    total = 0
    while True:
        status = await pool.execute(_PURGE_SENT, older_than, OUTBOX_PURGE_BATCH)
        n = int(status.rsplit(" ", 1)[-1])
        total += n
        if n < OUTBOX_PURGE_BATCH:
            return total


#: The client's retry key: printable ASCII, at most this long.
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_MAX = 255
#: Connections at most: one statement per request (plus the relay's), so 10 serve far more than
#: the pipeline's throughput; counted in the deployment's connection budget (docs/docker.md).
POOL_SIZE = 10


_INSERT_SQL = """
WITH known AS (
    SELECT EXISTS (SELECT 1 FROM students WHERE id = $2) AS student,
           EXISTS (SELECT 1 FROM courses WHERE id = $3) AS course
), payment AS (
    INSERT INTO payments (payment_id, correlation_id, student, course, amount, status,
                          idempotency_key)
    SELECT $1, $1, $2, $3, $4, 'succeeded', $9 FROM known WHERE known.student AND known.course
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING payment_id
), outbox AS (
    -- the event is always kept; with emit off (the skip-emit fault) the row is written as sent
    -- and never relayed: the service believes it emitted (the incident), redrive can re-emit it
    INSERT INTO payment_outbox (correlation_id, topic, event, trace_carrier, sent_at)
    SELECT payment_id, $6, $7, $8::jsonb, CASE WHEN $5::boolean THEN NULL ELSE now() END
    FROM payment
)
SELECT student, course, EXISTS (SELECT 1 FROM payment) AS created FROM known
"""

#: The payment an Idempotency-Key was first used for (read after the insert found it taken: a
#: concurrent first request has committed by then, as the insert waited for it).
_BY_KEY_SQL = "SELECT payment_id, student, course, amount FROM payments WHERE idempotency_key = $1"


def _idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key (None without one); BadRequest (422) if malformed."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if (
        not key.strip()
        or len(key) > IDEMPOTENCY_KEY_MAX
        or not key.isascii()
        or not key.isprintable()
    ):
        raise BadRequest(
            error(
                422,
                f"{IDEMPOTENCY_HEADER} must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters",
                IDEMPOTENCY_HEADER,
            )
        )
    return key


class PaymentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student: str = Field(min_length=1, max_length=200)
    course: str = Field(min_length=1, max_length=200)
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)


@dataclass(frozen=True)
class PaymentHooks:
    """The write path's hooks (the fault switches change them; the runner applies them)."""

    #: The outbox row is written with the payment, so the relay emits the event. False: the
    #: step ends with the write and nothing is ever produced.
    emit: bool = True
    #: Awaited with the payment id once the payment committed, before the relay is woken.
    after_write: Callable[[str], Awaitable[None]] | None = None


class PaymentService:
    """The HTTP app plus its outbox relay (one process; replicas share the outbox safely).
    ``fault`` is only reported by ``/healthz``."""

    def __init__(
        self,
        spec: PipelineSpec,
        pool: asyncpg.Pool,
        producer: HopProducer,
        hooks: PaymentHooks | None = None,
        fault: str | None = None,
        retention: timedelta | None = None,
    ):
        self.spec = spec
        self.retention = retention  # sent outbox rows older than this are purged
        self.step = spec.step_for_service(NAME)
        if not self.step.emits:
            raise ValueError(f"step {self.step.id!r} has no 'emits' topic in {spec.source}")
        self.pool = pool
        self.producer = producer
        self.hooks = hooks or PaymentHooks()
        self.fault = fault
        self._wake = asyncio.Event()
        self._stopping = False
        #: rows this process sent whose step spans are not exported yet (kept unsent)
        self._unexported: set[int] = set()

    # ---------------------------------------------------------------------------- HTTP

    def app(self) -> ASGIApp:
        routes = [
            Route("/payments", self.create_payment, methods=["POST"]),
            Route("/healthz", self.healthz),
        ]
        return instrumented(Starlette(routes=routes))

    async def healthz(self, _request: Request) -> JSONResponse:
        async with self.pool.acquire() as conn:
            unsent = await conn.fetchval(
                "SELECT count(*) FROM payment_outbox WHERE sent_at IS NULL"
            )
        return JSONResponse({"status": "ok", "fault": self.fault, "outbox_unsent": unsent})

    async def create_payment(self, request: Request) -> JSONResponse:
        try:
            key = _idempotency_key(request)
            req = await parse_body(request, PaymentRequest)
        except BadRequest as bad:
            return bad.response
        payment_id = str(uuid.uuid4())
        trace.get_current_span().set_attribute(ATTR_CORRELATION_ID, payment_id)
        with correlation_context(payment_id):
            event = new_event(
                PURCHASE_CONFIRMED,
                payment_id,
                PurchaseConfirmedV1(
                    payment_id=payment_id, student=req.student, course=req.course, amount=req.amount
                ),
            )
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            # one statement, so one round trip and atomic: the payment and its outbox row are
            # written together, and only when the student and the course exist
            async with self.pool.acquire() as conn:
                known = await conn.fetchrow(
                    _INSERT_SQL,
                    payment_id,
                    req.student,
                    req.course,
                    req.amount,
                    self.hooks.emit,
                    self.step.emits,
                    event.to_bytes(),
                    json.dumps(carrier),
                    key,
                )
                if not known["student"]:
                    return error(404, f"unknown student {req.student!r}", "student")
                if not known["course"]:
                    return error(404, f"unknown course {req.course!r}", "course")
                if not known["created"]:  # the key's first request made the payment
                    return await self._replay(conn, key, req)
            if self.hooks.after_write is not None:
                await self.hooks.after_write(payment_id)
            if self.hooks.emit:
                self._wake.set()
            else:  # the step is done as far as it knows, and nothing will be produced
                with step_span(self.spec, self.step.id, payment_id):
                    pass
        body = {"payment_id": payment_id, "correlation_id": payment_id, "status": "succeeded"}
        return JSONResponse(body, status_code=201)

    async def _replay(
        self, conn: asyncpg.Connection, key: str | None, req: PaymentRequest
    ) -> JSONResponse:
        """The answer to a retry: the payment its Idempotency-Key made, if it is the same one."""
        first = await conn.fetchrow(_BY_KEY_SQL, key)
        if first is None:  # cannot be: the insert found the key taken
            return error(500, "payment not written; retry")
        if (first["student"], first["course"], first["amount"]) != (
            req.student,
            req.course,
            req.amount,
        ):
            return error(
                422,
                f"{IDEMPOTENCY_HEADER} was already used for another payment",
                IDEMPOTENCY_HEADER,
            )
        payment_id = first["payment_id"]
        trace.get_current_span().set_attribute(ATTR_CORRELATION_ID, payment_id)
        body = {"payment_id": payment_id, "correlation_id": payment_id, "status": "succeeded"}
        return JSONResponse(body, status_code=201, headers={"Idempotent-Replayed": "true"})

    # ---------------------------------------------------------------------------- relay

    async def relay(self) -> None:
        """Emit unsent outbox rows until stopped: woken by each new payment, polls as a fallback
        (rows committed by a process that crashed before emitting). While a pass sends none of
        its rows (Kafka down, the database failing) it waits ``RELAY_POLL_S`` doubling to
        ``RELAY_MAX_BACKOFF_S`` between passes, new payments or not."""
        backoff = 0.0
        purged_at = float("-inf")
        while not self._stopping:
            now = asyncio.get_running_loop().time()
            if self.retention is not None and now - purged_at >= OUTBOX_PURGE_S:
                purged_at = now
                await self._purge()
            if backoff:
                await self._stop_or_sleep(backoff)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RELAY_POLL_S)
            self._wake.clear()
            stuck = False
            try:
                while not self._stopping:
                    rows, sent = await self.relay_once()
                    if rows and not sent:
                        stuck = True
                        break
                    if rows < RELAY_BATCH:
                        break
            except asyncio.CancelledError:
                raise
            except Exception:  # Kafka or Postgres hiccup: the rows stay unsent, retry later
                log.warning("outbox relay failed; retrying", exc_info=True)
                stuck = True
            backoff = min(RELAY_MAX_BACKOFF_S, max(RELAY_POLL_S, backoff * 2)) if stuck else 0.0
            if stuck:
                log.warning("outbox relay: nothing sent; next pass in %.1fs", backoff)

    async def _purge(self) -> None:
        assert self.retention is not None
        try:
            n = await purge_sent(self.pool, self.retention)
        except Exception as exc:  # noqa: BLE001 - housekeeping never stops the relay
            log.warning("outbox: purging sent rows failed: %s", exc)
            return
        if n:
            log.info("outbox: purged %d sent row(s) older than the retention", n)

    async def _stop_or_sleep(self, seconds: float) -> None:
        """Sleep, unless stop is requested first (new payments do not cut a backoff short)."""
        end = asyncio.get_running_loop().time() + seconds
        while not self._stopping:
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(left, RELAY_POLL_S))

    async def relay_once(self) -> tuple[int, int]:
        """Emit one batch of unsent rows (concurrently), export their step spans, then mark the
        rows Kafka acknowledged as sent (commit-after-export, as the hop runtime's offsets: a
        kill before the mark re-sends a row, with its span, instead of losing the span); returns
        (rows in the batch, rows sent).

        While the spans cannot be exported (the collector is down), the rows stay unsent: this
        process remembers them and does not send them again; a later pass marks them once the
        export went through (or the SDK gave the spans up after ``HOPTRACE_EXPORT_HOLD_S``)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT id, correlation_id, topic, event, trace_carrier FROM payment_outbox
                   WHERE sent_at IS NULL AND id <> ALL($2::bigint[])
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""",
                RELAY_BATCH,
                list(self._unexported),
            )
            if not rows and not self._unexported:
                return 0, 0
            results = await asyncio.gather(*(self._emit(r) for r in rows), return_exceptions=True)
            sent = [r["id"] for r, res in zip(rows, results, strict=True) if res is True]
            waiting = [*self._unexported, *sent]
            if waiting and await asyncio.to_thread(flush_tracing, RELAY_FLUSH_S):
                await conn.execute(
                    "UPDATE payment_outbox SET sent_at = now() WHERE id = ANY($1::bigint[])",
                    waiting,
                )
                self._unexported.clear()
            elif waiting:
                self._unexported.update(sent)
                log.warning(
                    "outbox relay: step spans not exported yet; %d row(s) kept unsent until they "
                    "are (not sent again)",
                    len(self._unexported),
                )
            failed = [res for res in results if res is not True]
            if failed:
                log.warning(
                    "outbox relay: %d of %d emits failed (%s)", len(failed), len(rows), failed[0]
                )
        return len(rows), len(sent)

    async def _emit(self, row: asyncpg.Record) -> bool:
        carrier = (
            json.loads(row["trace_carrier"])
            if isinstance(row["trace_carrier"], str)
            else row["trace_carrier"]
        )
        token = context.attach(propagate.extract(carrier or {}))
        try:
            envelope = Envelope.parse(bytes(row["event"]))
            with step_span(self.spec, self.step.id, row["correlation_id"]):
                await self.producer.emit(row["topic"], envelope)
        finally:
            context.detach(token)
        return True

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()


@contextlib.asynccontextmanager
async def serve(
    settings: WorkerSettings, spec: PipelineSpec, hooks: PaymentHooks
) -> AsyncIterator[ASGIApp]:
    """The app, with its producer, pool and outbox relay running until exit."""
    async with (
        HopProducer(settings.kafka_bootstrap, linger_ms=LINGER_MS) as producer,
        db.pool(settings.database_url, POOL_SIZE) as pool,
    ):
        service = PaymentService(
            spec,
            pool,
            producer,
            hooks,
            fault=settings.fault,
            retention=parse_duration(settings.retention),
        )
        relay = asyncio.create_task(service.relay(), name="outbox-relay")
        try:
            yield service.app()
        finally:
            service.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(relay, 10)


async def _crash(_payment_id: str) -> None:
    faults.crash()  # committed, not emitted: the relay of the next start must send it


SERVICE: HttpService[PaymentHooks] = HttpService(
    name=NAME,
    app=serve,
    hooks=PaymentHooks(),
    port_setting="payment_service_port",
    faults=(
        Fault(
            "skip-emit",
            "the payment row is written, the event never emitted",
            lambda hooks: dataclasses.replace(hooks, emit=False),
        ),
        Fault(
            faults.CRASH_AFTER_WRITE.name,
            "exits after the payment's commit, before the relay emits it",
            lambda hooks: dataclasses.replace(hooks, after_write=_crash),
        ),
    ),
)
