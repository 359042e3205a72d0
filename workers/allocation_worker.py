"""allocation-worker: PURCHASE_CREATED -> admin-service allocates a trainer over HTTP (it writes
``trainer_allocations``) -> the runtime verifies that row before marking processed ->
TRAINER_ALLOCATED. A 5xx or unreachable admin-service is retried; a 4xx is a poison record."""

from __future__ import annotations

import httpx

from hoptrace.instrumentation.envelope import PoisonRecord, RetryableError
from hoptrace.instrumentation.hop import Emit, HopContext

from . import http_client
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
    """The handler, bound to admin-service at ``base_url``. Requests go straight to an httpx
    transport (keep-alive connection on asyncio streams, see :mod:`.http_client`; traced by the
    httpx instrumentation like any httpx request): the client layer above it (base URL,
    redirects, cookies, auth, event hooks) is not needed here and cost about a third of the
    call's CPU. Each request in flight takes a single-connection transport from an idle list
    (one per concurrent record, reused): one shared pool's request-to-connection assignment
    scans all its connections on every request."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.url = httpx.URL(base_url.rstrip("/") + "/allocations")
        self.transport = transport  # given: used for every request
        self._idle: list[httpx.AsyncBaseTransport] = []
        self._made: list[httpx.AsyncBaseTransport] = []
        self._timeout = httpx.Timeout(timeout_s).as_dict()

    async def aclose(self) -> None:
        for transport in [*self._made, *([self.transport] if self.transport else [])]:
            await transport.aclose()
        self._idle.clear()
        self._made.clear()

    def _take(self) -> httpx.AsyncBaseTransport:
        if self.transport is not None:
            return self.transport
        if self._idle:
            return self._idle.pop()
        made = http_client.transport(self.base_url, connections=1)
        self._made.append(made)
        return made

    async def _post(self, body: dict[str, str]) -> httpx.Response:
        request = httpx.Request("POST", self.url, json=body, extensions={"timeout": self._timeout})
        transport = self._take()
        try:
            response = await transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        finally:
            if transport is not self.transport:
                self._idle.append(transport)
        return response

    async def handle(self, ctx: HopContext) -> Emit:
        event = payload_of(ctx.envelope)
        assert isinstance(event, PurchaseCreatedV1)
        body = {
            "correlation_id": ctx.correlation_id,
            "student": event.student,
            "course": event.course,
        }
        try:
            resp = await self._post(body)
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
