"""A client of the collector's read API (``api_http``) for the CLI and the dashboard: with
``HOPTRACE_API_URL`` set (e.g. ``http://collector:4318``), ``hoptrace trace``, ``hoptrace stalls``
and the dashboard read through it and need no database or Kafka credentials;
``HOPTRACE_API_TOKEN`` is sent as the bearer token (the collector's ``HOPTRACE_INGEST_TOKEN``).

Errors are :class:`ApiError` with the HTTP status (0: the API could not be reached) and the
API's own message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from hoptrace.settings import ApiClientSettings

from .api_openapi import PREFIX

URL_ENV = "HOPTRACE_API_URL"
#: Seconds a call may take (a lookup gathers Kafka and database facts within a few seconds).
TIMEOUT = 30.0


class ApiError(Exception):
    """The read API refused or failed a call. ``status`` 0: no answer (unreachable, timeout)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def api_url() -> str | None:
    """``HOPTRACE_API_URL`` when set (the CLI and the dashboard then read through the API)."""
    return ApiClientSettings().api_url


class ReadApiClient:
    """Calls ``/api/v1/...`` of one collector; one connection pool, reused."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url + PREFIX, headers=headers, timeout=timeout, trust_env=False
        )

    @classmethod
    def from_env(cls) -> ReadApiClient:
        cfg = ApiClientSettings()
        if cfg.api_url is None:
            raise ApiError(0, f"{URL_ENV} is not set")
        return cls(cfg.api_url, cfg.api_token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ReadApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        try:
            resp = self._http.get(path, params=clean)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"the read API at {self.url} did not answer: {exc}") from exc
        if resp.status_code != 200:
            try:
                detail = str(resp.json()["detail"])
            except (ValueError, KeyError, TypeError):
                detail = resp.text[:500] or resp.reason_phrase
            raise ApiError(resp.status_code, detail)
        return resp

    def trace(self, correlation_id: str, fmt: str = "json") -> str:
        """The lookup rendered as ``hoptrace trace --format fmt`` prints it."""
        return self._get(f"/correlations/{correlation_id}", {"format": fmt}).text

    def trace_document(self, correlation_id: str, spans: bool = False) -> dict[str, Any]:
        """The trace document; with ``spans``, the payment's spans too (``spans``)."""
        params = {"spans": "true"} if spans else None
        return self._get(f"/correlations/{correlation_id}", params).json()

    def correlations(self, **filters: Any) -> dict[str, Any]:
        """One page: ``{"items": [...], "next_cursor": str | None}``."""
        return self._get("/correlations", filters).json()

    def stalls(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._get("/stalls", {"limit": limit}).json()

    def pipeline(self) -> dict[str, Any]:
        return self._get("/pipeline").json()

    def overview(self, since: str, samples: bool = False) -> dict[str, Any]:
        return self._get(
            "/overview", {"since": since, "samples": "true" if samples else None}
        ).json()

    def alerts(self, limit: int = 200, status: str | None = None) -> list[dict[str, Any]]:
        return self._get("/alerts", {"limit": limit, "status": status}).json()
