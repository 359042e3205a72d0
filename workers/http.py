"""Small HTTP helpers shared by payment-service and admin-service: capped request bodies (413),
body validation with a 422 that names the field, JSON errors (``{"error": ...}``, read back by
:mod:`.client`), and a uvicorn server that leaves signals to the caller."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import TypeVar

import uvicorn
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.trace import TracerProvider
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

M = TypeVar("M", bound=BaseModel)
KEEP_ALIVE_S = 30
#: The key of an HTTP JSON error body's message.
ERROR_KEY = "error"
#: A request body larger than this is refused (413), unread past it: the services' bodies are a
#: few hundred bytes (room left for a malformed one to get its precise 422, e.g. nested too deep).
MAX_BODY_BYTES = 256 * 1024
#: Past the cap, the rest of a body up to this size is read and dropped, so the client reads the
#: 413 on a connection that stays usable; a larger one gets the 413 and a closed connection.
_DRAIN_BYTES = 64 * 1024 * 1024


class BadRequest(Exception):
    """Raised by :func:`parse_body`; carries the response to send."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.body)
        self.response = response


def error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, object] = {ERROR_KEY: message}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, at most ``limit`` bytes (declared or streamed); :class:`BadRequest`
    (413) beyond that, without keeping more than ``limit`` bytes in memory."""
    declared = request.headers.get("content-length", "")
    too_large = BadRequest(error(413, f"request body over the {limit}-byte limit"))
    if declared.isdigit() and int(declared) > _DRAIN_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    over = declared.isdigit() and int(declared) > limit
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            over = True
            if size > _DRAIN_BYTES:
                break
            continue  # read and dropped (see _DRAIN_BYTES)
        chunks.append(chunk)
    if over:
        raise too_large
    return b"".join(chunks)


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as ``model``; :class:`BadRequest` otherwise (413 over
    :data:`MAX_BODY_BYTES`, 422 naming each bad field)."""
    raw = await read_body(request)
    try:
        data = json.loads(raw or b"null")
        nul = _has_nul(data)
    except RecursionError:
        raise BadRequest(error(422, "body is not valid JSON: nested too deeply")) from None
    except ValueError as exc:
        raise BadRequest(error(422, f"body is not valid JSON: {exc}")) from None
    if nul:  # PostgreSQL text cannot hold NUL: a clear 422, not a failed query
        raise BadRequest(error(422, "body holds a NUL character (\\u0000), which is not allowed"))
    if not isinstance(data, dict):
        raise BadRequest(error(422, "body must be a JSON object"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "<body>", "message": e["msg"]}
            for e in exc.errors()
        ]
        body = {
            ERROR_KEY: "invalid request body",
            "field": problems[0]["field"],
            "problems": problems,
        }
        raise BadRequest(JSONResponse(body, status_code=422)) from None


def instrumented(
    app: Starlette, tracer_provider: TracerProvider | None = None
) -> OpenTelemetryMiddleware:
    """The app wrapped in OpenTelemetry's ASGI middleware (server spans, context extraction),
    without its per-message spans (one for each ASGI receive and send of a request: two or three
    spans per request that say nothing the server span does not)."""
    return OpenTelemetryMiddleware(
        app, tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
    )


class Server(uvicorn.Server):
    """uvicorn server that does not install signal handlers (run.py owns SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def start_server(app: object, host: str, port: int) -> tuple[Server, asyncio.Task[None]]:
    """Start serving; returns once the socket is listening (raises if startup failed)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="httptools",  # the C parser (a dependency), never the pure-Python h11
        # per request CPU: no proxy-header rewriting (not behind a proxy), no Server/Date header
        proxy_headers=False,
        server_header=False,
        date_header=False,
        # longer than clients keep idle connections (httpx: 5 s), so a client never sends a
        # request on a connection the server is closing at that moment (a ReadError)
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"HTTP server on {host}:{port} did not start")
        await asyncio.sleep(0.02)
    return server, task


async def stop_server(server: Server, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 10)
