"""The handlers' HTTP client (``hoptrace.instrumentation.http.HttpClient``) and its accelerated
transports (``_accel.http``: httpcore over asyncio streams, an idle list of single-connection
transports): requests and keep-alive, a server that closes connections, errors mapped to httpx's
(an unreachable downstream service is an outage), and its requests traced by the httpx
instrumentation like httpx's own transport. The keep-alive tests use the accelerated transports
directly (they exist whatever ``HOPTRACE_ACCEL`` says); the rest go through ``HttpClient``, on
whichever path the switch chose."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from hoptrace.instrumentation._accel.http import AsyncioBackend, Transports, transport
from hoptrace.instrumentation.hop import is_outage
from hoptrace.instrumentation.http import HttpClient
from hoptrace.instrumentation.tracing import configure_tracing, shutdown_tracing
from tests.support import free_port

BODY = {"correlation_id": "c-1", "student": "student-1", "course": "course-1"}


class Allocator:
    """Posts BODY the way a handler does, through the transports or the client."""

    def __init__(self, url: str, timeout_s: float = 5.0, *, client: bool = False) -> None:
        self.transports = None if client else Transports(url, timeout_s=timeout_s)
        self.client = HttpClient(url, timeout=timeout_s) if client else None
        self._made = self.transports._made if self.transports is not None else []

    async def _post(self, body: dict) -> httpx.Response:
        if self.transports is not None:
            return await self.transports.request("POST", "/allocations", json=body)
        assert self.client is not None
        return await self.client.post("/allocations", json=body)

    async def aclose(self) -> None:
        for closing in (self.transports, self.client):
            if closing is not None:
                await closing.aclose()


class Server:
    """A small HTTP/1.1 server: answers each POST with the trainer; counts connections."""

    def __init__(self, close_after_each: bool = False, delay_s: float = 0.0) -> None:
        self.close_after_each = close_after_each
        self.delay_s = delay_s
        self.connections = 0
        self.bodies: list[dict] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.bodies.append(json.loads(await reader.readexactly(length)))
                await asyncio.sleep(self.delay_s)
                body = json.dumps({"trainer": "trainer-1"}).encode()
                close = b"Connection: close\r\n" if self.close_after_each else b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + close
                    + b"Content-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
                if self.close_after_each:
                    return
        finally:
            writer.close()


async def _serve(server: Server) -> AsyncIterator[str]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.close()


@pytest.fixture
async def keep_alive() -> AsyncIterator[tuple[Server, str]]:
    server = Server()
    async for url in _serve(server):
        yield server, url


async def test_requests_share_one_keep_alive_connection(keep_alive) -> None:
    server, url = keep_alive
    allocator = Allocator(url)
    try:
        for _ in range(3):
            resp = await allocator._post(BODY)
            assert resp.status_code == 200 and resp.json() == {"trainer": "trainer-1"}
        made = allocator._made
        assert len(made) == 1
        assert isinstance(made[0]._pool._network_backend, AsyncioBackend)  # type: ignore[attr-defined]
    finally:
        await allocator.aclose()
    assert server.bodies == [BODY] * 3
    assert server.connections == 1


async def test_concurrent_requests_get_a_connection_each_and_reuse_them(keep_alive) -> None:
    server, url = keep_alive
    allocator = Allocator(url)
    try:
        for _ in range(2):  # the second round reuses the first round's connections
            answers = await asyncio.gather(*(allocator._post(BODY) for _ in range(5)))
            assert [a.json() for a in answers] == [{"trainer": "trainer-1"}] * 5
    finally:
        await allocator.aclose()
    assert len(server.bodies) == 10
    assert server.connections == 5


async def test_a_server_closing_each_connection_gets_a_new_one_per_request() -> None:
    server = Server(close_after_each=True)
    async for url in _serve(server):
        allocator = Allocator(url)
        try:
            for _ in range(3):
                assert (await allocator._post(BODY)).json() == {"trainer": "trainer-1"}
        finally:
            await allocator.aclose()
    assert server.connections == 3


async def test_unreachable_is_an_httpx_connect_error_and_an_outage() -> None:
    allocator = Allocator(f"http://127.0.0.1:{free_port()}", client=True)
    try:
        with pytest.raises(httpx.ConnectError) as info:
            await allocator._post(BODY)
    finally:
        await allocator.aclose()
    assert is_outage(info.value)


async def test_a_slow_answer_is_an_httpx_read_timeout() -> None:
    server = Server(delay_s=1.0)
    async for url in _serve(server):
        allocator = Allocator(url, timeout_s=0.2, client=True)
        try:
            with pytest.raises(httpx.ReadTimeout):
                await allocator._post(BODY)
        finally:
            await allocator.aclose()


async def test_https_keeps_httpx_default_transport() -> None:
    out = transport("https://admin.example")
    try:
        assert not isinstance(out._pool._network_backend, AsyncioBackend)  # type: ignore[attr-defined]
    finally:
        await out.aclose()


async def test_requests_are_traced_as_http_client_spans(keep_alive) -> None:
    _, url = keep_alive
    spans = InMemorySpanExporter()
    configure_tracing("hoptrace-tests", exporter=spans, simple=True)
    allocator = Allocator(url, client=True)
    try:
        await allocator._post(BODY)
    finally:
        await allocator.aclose()
        shutdown_tracing(timeout_s=2.0)
    client = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert len(client) == 1
    attrs = client[0].attributes or {}
    assert attrs.get("http.response.status_code", attrs.get("http.status_code")) == 200
