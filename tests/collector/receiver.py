"""A real HTTP alert receiver for tests: records POST bodies per path; can fail the first N and
answer slowly."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..support import free_port


class Receiver:
    def __init__(self, fail_first: int = 0, delay: float = 0.0) -> None:
        self.posts: dict[str, list[Any]] = {}
        self.fail_first = fail_first
        self.delay = delay  # seconds each answer takes (a slow receiver)
        self.failures = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

        async def record(request: Request) -> JSONResponse:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.failures < self.fail_first:
                self.failures += 1
                return JSONResponse({"error": "down"}, 503)
            self.posts.setdefault(request.url.path, []).append(await request.json())
            return JSONResponse({"ok": True})

        app = Starlette(routes=[Route("/{path:path}", record, methods=["POST"])])
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Receiver:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:  # noqa: ASYNC110 - uvicorn exposes no event
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task

    def webhook(self, status: str | None = None) -> list[dict[str, Any]]:
        out = self.posts.get("/hook", [])
        return [p for p in out if status is None or p["status"] == status]

    def alertmanager(self) -> list[dict[str, Any]]:
        return [a for batch in self.posts.get("/api/v2/alerts", []) for a in batch]
