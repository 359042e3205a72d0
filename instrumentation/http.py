"""A small HTTP client for handlers that call a downstream service (e.g. allocation-worker ->
admin-service): JSON POSTs to one base URL, traced by the httpx instrumentation (one CLIENT span
per request, carrying the correlation baggage) like any httpx request.

With the speed-ups on (``HOPTRACE_ACCEL``, see ``hoptrace.instrumentation._accel``) requests go
straight to httpx transports on asyncio streams (``_accel.http``); otherwise through httpx's
stock ``AsyncClient``. Both raise httpx's errors (``httpx.ConnectError`` for an unreachable
service: an outage to the hop runtime, ``httpx.ReadTimeout`` for a slow one) and return the
response with its body read.
"""

from __future__ import annotations

from typing import Any

import httpx

from ._accel import Speedup, enabled


class HttpClient:
    """JSON requests to ``base_url`` with a ``timeout`` (seconds) per request."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._transports: Any = None
        if enabled(Speedup.HTTP_TRANSPORT):
            from ._accel.http import Transports

            self._transports = Transports(self.base_url, timeout_s=timeout)
        else:
            self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def post(self, path: str, *, json: Any = None) -> httpx.Response:
        """POST ``json`` to ``base_url + path``; the response, its body read."""
        if self._transports is not None:
            return await self._transports.request("POST", path, json=json)
        assert self._client is not None
        return await self._client.post(path, json=json)

    async def aclose(self) -> None:
        """Close the connections (the client is not used after this)."""
        if self._transports is not None:
            await self._transports.aclose()
        if self._client is not None:
            await self._client.aclose()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["HttpClient"]
