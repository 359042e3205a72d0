"""What one service of the reference pipeline is, as the runner (`hoptrace worker NAME`), the
command line and the local stack read it: its name, its kind, how it is built from the
settings, the event type it validates, its fault switches (each with one line saying what it
does) and the setting holding its port.

Each service module declares one :class:`HopWorker` or :class:`HttpService` (the allocation
worker's is in :mod:`.registry`, next to the factory that builds its handler from the settings);
:mod:`.registry` lists them all. A fault switch is a :class:`Fault`: a change to the hooks and
options the runner gives the service, never a branch in the service's business code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeVar

from starlette.types import ASGIApp

from hoptrace.contract import PipelineSpec, Step
from hoptrace.instrumentation.hop import Handler, HopHooks, HopOptions
from hoptrace.settings import Settings, WorkerSettings

H = TypeVar("H")


class Kind(StrEnum):
    HOP_WORKER = "hop worker"
    HTTP_SERVICE = "HTTP service"


@dataclass(frozen=True)
class Fault(Generic[H]):
    """A fault switch: its name, what it does (one line), and how it changes the hooks ``H`` the
    runner gives the service (:class:`HopSetup` for a hop worker, the service's own hooks for an
    HTTP service)."""

    name: str
    description: str
    apply: Callable[[H], H]


@dataclass(frozen=True)
class HopSetup:
    """What the runner builds a hop worker's runtimes from; a fault may change the options and
    the hooks (``step`` is the spec's step the worker runs)."""

    step: Step
    options: HopOptions
    hooks: HopHooks

    def with_options(self, **changes: Any) -> HopSetup:
        return dataclasses.replace(self, options=self.options.replace(**changes))

    def with_hooks(self, **changes: Any) -> HopSetup:
        return dataclasses.replace(self, hooks=dataclasses.replace(self.hooks, **changes))


#: Builds a hop worker's handler from the settings (and closes what it opened on exit).
HandlerFactory = Callable[[WorkerSettings], AbstractAsyncContextManager[Handler]]


def plain(handler: Handler) -> HandlerFactory:
    """The factory of a handler that needs nothing from the settings (a module function)."""

    @asynccontextmanager
    async def factory(_settings: WorkerSettings) -> AsyncIterator[Handler]:
        yield handler

    return factory


@dataclass(frozen=True, kw_only=True)
class Service(Generic[H]):
    """A service of the reference pipeline. ``port_setting`` names the :class:`Settings` field
    holding the port it listens on (None: it listens on none)."""

    kind: ClassVar[Kind]
    name: str
    faults: tuple[Fault[H], ...] = ()
    port_setting: str | None = None

    def __post_init__(self) -> None:
        if self.port_setting is not None and self.port_setting not in Settings.model_fields:
            raise ValueError(f"{self.name}: no setting {self.port_setting!r} holds its port")

    def port(self, settings: Settings) -> int | None:
        return getattr(settings, self.port_setting) if self.port_setting else None

    @property
    def fault_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.faults)

    def fault(self, name: str | None) -> Fault[H] | None:
        """The fault switch ``name`` (None/"" means none); ValueError listing the allowed."""
        if not name:
            return None
        for fault in self.faults:
            if fault.name == name:
                return fault
        if not self.faults:
            raise ValueError(f"{self.name} has no fault switches")
        raise ValueError(
            f"unknown fault {name!r} for {self.name}; allowed: {', '.join(self.fault_names)}"
        )


@dataclass(frozen=True, kw_only=True)
class HopWorker(Service[HopSetup]):
    """Consumes its step's topic through the hop runtime; ``consumes`` is the event type it
    validates (anything else is a poison record)."""

    kind: ClassVar[Kind] = Kind.HOP_WORKER
    consumes: str
    handler: HandlerFactory


#: Builds an HTTP service's ASGI app (and what it runs beside it) from the settings, the spec
#: and its hooks; closes them on exit. The runner serves the app on the service's port.
AppFactory = Callable[[WorkerSettings, PipelineSpec, H], AbstractAsyncContextManager[ASGIApp]]


@dataclass(frozen=True, kw_only=True)
class HttpService(Service[H]):
    """An HTTP service; ``hooks`` are its hooks with no fault switched on."""

    kind: ClassVar[Kind] = Kind.HTTP_SERVICE
    app: AppFactory[H]
    hooks: H
    port_setting: str

    def hooks_for(self, fault: Fault[H] | None) -> H:
        return fault.apply(self.hooks) if fault else self.hooks
