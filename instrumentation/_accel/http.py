"""The accelerated HTTP path of ``hoptrace.instrumentation.http.HttpClient``: httpcore's
connection pool over plain asyncio streams, and an idle list of single-connection transports.

httpx's default transport reaches the socket through anyio (a cancel scope per read and write,
typed-attribute lookups for every keep-alive check), which cost about a third of a handler's
request CPU. :class:`AsyncioBackend` implements httpcore's public network-backend interface on
asyncio streams; everything above it (httpcore's HTTP/1.1, the pool, httpx's transport and so
the httpx instrumentation's client spans) stays as it is. Plain ``http://`` only: an
``https://`` URL gets httpx's default transport. The private part: the transport's pool is
replaced through ``AsyncHTTPTransport._pool``.

:class:`Transports` sends requests straight to a transport (the client layer above it: base URL,
redirects, cookies, auth, event hooks, is not needed by a handler and cost about a third of the
call's CPU); each request in flight takes a single-connection transport from an idle list (one
per concurrent request, reused): one shared pool's request-to-connection assignment scans all
its connections on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing

import httpcore
import httpx

_MAX_BUFFERED = 64 * 1024


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            if self._writer.is_closing():
                raise httpcore.WriteError("the connection is closed")
            self._writer.write(buffer)
            if self._writer.transport.get_write_buffer_size() > _MAX_BUFFERED:
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def start_tls(
        self,
        ssl_context: typing.Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS is not supported by this transport (plain http only)")

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":  # the keep-alive check: the server closed the connection
            return self._reader.at_eof() or self._reader.exception() is not None
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend on asyncio streams (TCP_NODELAY is asyncio's default)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc) or "connect timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _Stream(reader, writer)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported by this transport")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def transport(url: str, connections: int | None = None) -> httpx.AsyncBaseTransport:
    """An httpx transport for requests to ``url`` (at most ``connections`` at once; httpx's
    default limits when None): on :class:`AsyncioBackend` for ``http://`` (httpx's own for
    anything else). Still an ``httpx.AsyncHTTPTransport``, so the httpx instrumentation traces
    its requests."""
    limits = httpx.Limits(
        max_connections=connections or httpx.Limits().max_connections,
        max_keepalive_connections=connections or httpx.Limits().max_keepalive_connections,
    )
    out = httpx.AsyncHTTPTransport(limits=limits)
    if httpx.URL(url).scheme == "http":
        out._pool = httpcore.AsyncConnectionPool(  # the same pool httpx builds, another backend
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )
    return out


class Transports:
    """Requests to ``base_url`` on an idle list of single-connection transports (see module
    doc); ``transport`` given: every request goes to it."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.transport = transport
        self._idle: list[httpx.AsyncBaseTransport] = []
        self._made: list[httpx.AsyncBaseTransport] = []
        self._timeout = httpx.Timeout(timeout_s).as_dict()
        self._urls: dict[str, httpx.URL] = {}  # parsed once per path

    async def aclose(self) -> None:
        for made in [*self._made, *([self.transport] if self.transport else [])]:
            await made.aclose()
        self._idle.clear()
        self._made.clear()

    def _take(self) -> httpx.AsyncBaseTransport:
        if self.transport is not None:
            return self.transport
        if self._idle:
            return self._idle.pop()
        made = transport(self.base_url, connections=1)
        self._made.append(made)
        return made

    async def request(self, method: str, path: str, json: typing.Any = None) -> httpx.Response:
        """Send, read the whole body, return the response (httpx's errors as httpx raises)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        request = httpx.Request(
            method,
            url,
            json=json,
            extensions={"timeout": self._timeout},
        )
        used = self._take()
        try:
            response = await used.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        finally:
            if used is not self.transport:
                self._idle.append(used)
        response.request = request
        return response
