"""admin-service: allocates a trainer for a purchase over HTTP and writes ``trainer_allocations``
(idempotent on the correlation id). Faults: ``http-500``, ``silent-no-write``."""

from __future__ import annotations

import hashlib
from typing import Annotated

import asyncpg
from opentelemetry import trace
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hoptrace.ids import validate_correlation_id

from . import faults
from .http import BadRequest, error, instrumented, parse_body

TRAINERS = tuple(f"trainer-{n}" for n in range(1, 11))


class AllocationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    correlation_id: Annotated[str, AfterValidator(validate_correlation_id)]
    student: str = Field(min_length=1, max_length=200)
    course: str = Field(min_length=1, max_length=200)


def pick_trainer(course: str, student: str) -> str:
    """Deterministic choice, so a retried allocation names the same trainer."""
    digest = hashlib.sha256(f"{course}/{student}".encode()).digest()
    return TRAINERS[digest[0] % len(TRAINERS)]


def build_app(pool: asyncpg.Pool, fault: str | None) -> object:
    async def allocate(request: Request) -> JSONResponse:
        try:
            req = await parse_body(request, AllocationRequest)
        except BadRequest as bad:
            return bad.response
        span = trace.get_current_span()
        span.set_attribute("hoptrace.correlation_id", req.correlation_id)
        if fault == faults.HTTP_500:
            return error(500, "injected fault http-500: allocation failed")
        trainer = pick_trainer(req.course, req.student)
        if fault == faults.SILENT_NO_WRITE:
            # the incident: success reported, nothing written
            return JSONResponse(
                {"correlation_id": req.correlation_id, "trainer": trainer, "created": True}
            )
        async with pool.acquire() as conn:
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
        routes=[Route("/allocations", allocate, methods=["POST"]), Route("/healthz", healthz)]
    )
    return instrumented(app)
