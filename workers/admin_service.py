"""admin-service: allocates a trainer for a purchase over HTTP and writes ``trainer_allocations``
(idempotent on the correlation id).

Its fault switches (:data:`SERVICE`) are :class:`AdminHooks`: ``http-500`` (a middleware in
front of the allocation endpoint answers 500) and ``silent-no-write`` (the allocation's
transaction is rolled back, the answer is the one of a written row)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Annotated

import asyncpg
from opentelemetry import trace
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from hoptrace.contract import PipelineSpec
from hoptrace.contract.conventions import ATTR_CORRELATION_ID
from hoptrace.ids import validate_correlation_id
from hoptrace.settings import WorkerSettings

from . import db
from .http import BadRequest, error, instrumented, parse_body
from .service import Fault, HttpService

NAME = "admin-service"
TRAINERS = tuple(f"trainer-{n}" for n in range(1, 11))
POOL_SIZE = 10


class AllocationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    correlation_id: Annotated[str, AfterValidator(validate_correlation_id)]
    student: str = Field(min_length=1, max_length=200)
    course: str = Field(min_length=1, max_length=200)


def pick_trainer(course: str, student: str) -> str:
    """Deterministic choice, so a retried allocation names the same trainer."""
    digest = hashlib.sha256(f"{course}/{student}".encode()).digest()
    return TRAINERS[digest[0] % len(TRAINERS)]


#: What the allocation's statements run in, on the connection they use.
WriteScope = Callable[[asyncpg.Connection], AbstractAsyncContextManager[object]]


def _as_they_go(_conn: asyncpg.Connection) -> AbstractAsyncContextManager[object]:
    return contextlib.nullcontext()  # each statement commits by itself


@dataclass(frozen=True)
class AdminHooks:
    """The allocation path's hooks (the fault switches change them; the runner applies them)."""

    #: Middleware in front of the allocation endpoint.
    middleware: Sequence[Middleware] = ()
    #: Wraps the allocation's write (by default its statements commit as they go).
    write_scope: WriteScope = _as_they_go


def build_app(
    pool: asyncpg.Pool, hooks: AdminHooks | None = None, fault: str | None = None
) -> ASGIApp:
    """The app; ``fault`` is only reported by ``/healthz``."""
    hooks = hooks or AdminHooks()

    async def allocate(request: Request) -> JSONResponse:
        try:
            req = await parse_body(request, AllocationRequest)
        except BadRequest as bad:
            return bad.response
        trace.get_current_span().set_attribute(ATTR_CORRELATION_ID, req.correlation_id)
        trainer = pick_trainer(req.course, req.student)
        async with pool.acquire() as conn, hooks.write_scope(conn):
            row = await conn.fetchrow(
                """INSERT INTO trainer_allocations (correlation_id, student, course, trainer)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (correlation_id) DO NOTHING RETURNING trainer""",
                req.correlation_id,
                req.student,
                req.course,
                trainer,
            )
            created = row is not None
            if not created:
                trainer = await conn.fetchval(
                    "SELECT trainer FROM trainer_allocations WHERE correlation_id = $1",
                    req.correlation_id,
                )
        return JSONResponse(
            {"correlation_id": req.correlation_id, "trainer": trainer, "created": created}
        )

    async def healthz(_request: Request) -> JSONResponse:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        return JSONResponse({"status": "ok", "fault": fault})

    app = Starlette(
        routes=[
            Route("/allocations", allocate, methods=["POST"], middleware=hooks.middleware),
            Route("/healthz", healthz),
        ]
    )
    return instrumented(app)


@contextlib.asynccontextmanager
async def serve(
    settings: WorkerSettings, _spec: PipelineSpec, hooks: AdminHooks
) -> AsyncIterator[ASGIApp]:
    """The app, with its pool open until exit."""
    async with db.pool(settings.database_url, POOL_SIZE) as pool:
        yield build_app(pool, hooks, fault=settings.fault)


# ------------------------------------------------------------------------------- fault hooks


class _Answer500:
    """ASGI middleware: every request fails with a 500, the endpoint never runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error(500, "injected fault http-500: allocation failed")(scope, receive, send)


@contextlib.asynccontextmanager
async def _rolled_back(conn: asyncpg.Connection) -> AsyncIterator[object]:
    """A transaction that is rolled back however the write ends."""
    tx = conn.transaction()
    await tx.start()
    try:
        yield tx
    finally:
        await tx.rollback()


SERVICE: HttpService[AdminHooks] = HttpService(
    name=NAME,
    app=serve,
    hooks=AdminHooks(),
    port_setting="admin_service_port",
    faults=(
        Fault(
            "http-500",
            "every allocation answers 500",
            lambda hooks: dataclasses.replace(hooks, middleware=(Middleware(_Answer500),)),
        ),
        Fault(
            "silent-no-write",
            "answers 200 with a trainer and writes nothing (its transaction is rolled back)",
            lambda hooks: dataclasses.replace(hooks, write_scope=_rolled_back),
        ),
    ),
)
