"""allocation-worker: PURCHASE_CREATED -> admin-service allocates a trainer over HTTP (it writes
``trainer_allocations``) -> the runtime verifies that row before marking processed ->
TRAINER_ALLOCATED. A 5xx or unreachable admin-service is retried; a 4xx is a poison record."""

from __future__ import annotations

import httpx

from hoptrace.instrumentation.envelope import PoisonRecord, RetryableError
from hoptrace.instrumentation.hop import Emit, HopContext
from hoptrace.instrumentation.http import HttpClient

from .events import (
    PURCHASE_CREATED,
    TRAINER_ALLOCATED,
    PurchaseCreatedV1,
    TrainerAllocatedV1,
    payload_of,
)

SERVICE = "allocation-worker"
CONSUMES = PURCHASE_CREATED


class Allocator:
    """The handler, bound to admin-service at ``base_url`` (its HTTP calls traced as client
    spans by the instrumentation's :class:`HttpClient`)."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url
        self.client = HttpClient(base_url, timeout=timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def handle(self, ctx: HopContext) -> Emit:
        event = payload_of(ctx.envelope)
        assert isinstance(event, PurchaseCreatedV1)
        body = {
            "correlation_id": ctx.correlation_id,
            "student": event.student,
            "course": event.course,
        }
        try:
            resp = await self.client.post("/allocations", json=body)
        except httpx.HTTPError as exc:
            raise RetryableError(f"admin-service unreachable: {type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 500:
            raise RetryableError(f"admin-service answered {resp.status_code}: {resp.text[:200]}")
        if resp.status_code >= 400:
            raise PoisonRecord(
                f"admin-service rejected the allocation ({resp.status_code}): {resp.text[:200]}"
            )
        trainer = resp.json().get("trainer")
        if not trainer:
            raise RetryableError("admin-service answered without a trainer")
        payload = TrainerAllocatedV1(
            payment_id=event.payment_id, student=event.student, course=event.course, trainer=trainer
        )
        return Emit(TRAINER_ALLOCATED, payload.model_dump(mode="json"))
