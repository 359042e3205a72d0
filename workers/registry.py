"""The reference pipeline's services by name, in the order the local stack starts them (a
service before the one calling it). `hoptrace worker NAME`, the command line and the local
stack read this registry and no other list of services.

Each service module declares its own :class:`~.service.Service`; allocation-worker's business
code (:class:`~.allocation_worker.Allocator`) is registered here, with the factory that builds
it from the settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from hoptrace.instrumentation.hop import Handler
from hoptrace.settings import Settings, WorkerSettings

from . import admin_service, faults, payment_service, purchase_worker, session_worker
from .allocation_worker import Allocator
from .events import PURCHASE_CREATED
from .service import HopWorker, Service

#: How long allocation-worker waits for admin-service's answer.
ALLOCATION_TIMEOUT_S = 5.0


def admin_service_url(settings: Settings) -> str:
    """admin-service's base URL: ``HOPTRACE_ADMIN_SERVICE_URL``, else its local address."""
    if settings.admin_service_url:
        return settings.admin_service_url.rstrip("/")
    return f"http://{settings.bind_host}:{settings.admin_service_port}"


@asynccontextmanager
async def _allocator(settings: WorkerSettings) -> AsyncIterator[Handler]:
    allocator = Allocator(admin_service_url(settings), timeout_s=ALLOCATION_TIMEOUT_S)
    try:
        yield allocator.handle
    finally:
        await allocator.aclose()


ALLOCATION_WORKER = HopWorker(
    name="allocation-worker",
    consumes=PURCHASE_CREATED,
    handler=_allocator,
    faults=(faults.NO_VERIFY, faults.WRONG_GROUP, faults.SLOW, faults.CRASH_AFTER_WRITE),
)

SERVICES: dict[str, Service[Any]] = {
    s.name: s
    for s in (
        admin_service.SERVICE,
        payment_service.SERVICE,
        purchase_worker.SERVICE,
        ALLOCATION_WORKER,
        session_worker.SERVICE,
    )
}

#: Service name -> the names of its fault switches (services that have some).
FAULTS: dict[str, tuple[str, ...]] = {
    name: s.fault_names for name, s in SERVICES.items() if s.faults
}


def service(name: str) -> Service[Any]:
    """The service ``name``; ValueError naming the services otherwise."""
    try:
        return SERVICES[name]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; one of: {', '.join(SERVICES)}") from None


def validate_fault(name: str, fault: str | None) -> str | None:
    """``fault`` if ``name`` has that switch (None/"" means no fault); ValueError listing the
    allowed ones otherwise."""
    if not fault:
        return None
    if name not in FAULTS:
        raise ValueError(f"{name} has no fault switches (services that do: {', '.join(FAULTS)})")
    SERVICES[name].fault(fault)
    return fault
