"""The collector's read API over HTTP (``/api/v1/...``), mounted on the OTLP/HTTP app (port 4318):
where a payment stopped and why, lists of payments with filters, stalls, the pipeline spec, the
overview and the alerts. Its OpenAPI document is ``GET /api/v1/openapi.json`` (``api_openapi``).

The CLI (``HOPTRACE_API_URL``) and the dashboard read through it instead of holding database and
Kafka credentials. Every route but the document takes the ingest token as a bearer token when
``HOPTRACE_INGEST_TOKEN`` is set (401 otherwise). Bad parameters get a 400 with a message naming
them (``api_query``); a store that does not answer in time, a 503. Reads go through the
collector's read facade (``api``) and its shared evidence clients: a small pool of their own
(single statements, a few seconds each), apart from the writers' pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hoptrace.contract import PipelineSpec
from hoptrace.settings import Settings

from . import api, api_json, api_openapi, listing
from .api_query import BadQuery, parse_limit, parse_time
from .render import render, to_dict

JSON = "application/json"
PREFIX = api_openapi.PREFIX
#: ``GET /correlations/{id}`` formats and their media types.
FORMATS = {"json": JSON, "text": "text/plain; charset=utf-8", "markdown": "text/markdown"}
#: Spans a trace document carries at most (``spans=true``).
SPANS_LIMIT = 2000
#: Payments whose hop latencies feed the overview's percentiles.
LATENCY_SAMPLES = 5000
#: Seconds a list or count read may take before the API answers 503.
READ_TIMEOUT = 10.0

Authorized = Callable[[str | None], bool]
#: A trace document field name that is also a contract word (spelled as a keyword).
[KAFKA] = dict(kafka=1)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type=JSON)


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"detail": detail}), status, headers, media_type=JSON)


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").strip().lower()
    if value not in ("true", "false", "1", "0", ""):
        raise BadQuery(f"bad {name} {value!r}: use true or false")
    return value in ("true", "1")


def _only(request: Request, *names: str) -> None:
    unknown = sorted(set(request.query_params) - set(names))
    if unknown:
        accepted = ", ".join(names) or "none"
        raise BadQuery(f"unknown parameter {', '.join(unknown)}: this route takes {accepted}")


class ReadApi:
    """The routes, on one collector's settings and spec."""

    def __init__(self, settings: Settings, spec: PipelineSpec, authorized: Authorized) -> None:
        self.settings = settings
        self.spec = spec
        self.authorized = authorized

    async def pool(self) -> asyncpg.Pool:
        return await api.sources_for(self.settings).db()

    def routes(self) -> list[Route]:
        guarded = [
            ("/correlations/{correlation_id}", self.correlation),
            ("/correlations", self.correlations),
            ("/stalls", self.stalls),
            ("/pipeline", self.pipeline),
            ("/overview", self.overview),
            ("/alerts", self.alerts),
        ]
        out = [Route(PREFIX + path, self._guard(fn), methods=["GET"]) for path, fn in guarded]
        out.append(Route(f"{PREFIX}/openapi.json", self.openapi, methods=["GET"]))
        return out

    def _guard(self, fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def guarded(request: Request) -> Response:
            if not self.authorized(request.headers.get("authorization")):
                return problem(
                    401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}
                )
            try:
                return await fn(request)
            except BadQuery as exc:
                return problem(400, str(exc))
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                return problem(503, f"the store did not answer: {type(exc).__name__}: {exc}")

        return guarded

    async def openapi(self, _: Request) -> Response:
        return _json(api_openapi.document())

    async def correlation(self, request: Request) -> Response:
        _only(request, "format", "spans")
        cid = request.path_params["correlation_id"]
        fmt = request.query_params.get("format", "json")
        if fmt not in FORMATS:
            raise BadQuery(f"unknown format {fmt!r}: use text, json or markdown")
        with_spans = _flag(request, "spans")
        try:
            api.validate_id(cid)
        except api.MalformedId as exc:
            return problem(400, str(exc))
        d = await api.diagnose(cid, settings=self.settings, spec=self.spec)
        if not d.found:
            status, detail = api_json.not_found_reason(d)
            return problem(status, detail)
        jaeger = self.settings.jaeger_url
        if fmt != "json":
            return Response(render(d, fmt, jaeger), media_type=FORMATS[fmt])
        if not with_spans:  # byte for byte what `hoptrace trace --format json` prints
            return Response(render(d, "json", jaeger), media_type=JSON)
        doc = to_dict(d, jaeger)
        spans = list(d.facts.spans) if d.facts is not None else []
        kafka = d.facts.kafka if d.facts is not None else {}
        for step in doc["steps"]:  # whether the dead letters were looked at (a timeline's facts)
            if step["id"] in kafka and step.get(KAFKA):
                step[KAFKA]["dlq_checked"] = kafka[step["id"]].dlq_checked
        doc["spans"] = [api_json.span_json(s, d.span_steps) for s in spans[:SPANS_LIMIT]]
        return _json(doc)

    async def correlations(self, request: Request) -> Response:
        pool = await self.pool()
        page = await asyncio.wait_for(
            listing.page(pool, self.spec, request.query_params), READ_TIMEOUT
        )
        return _json(page)

    async def stalls(self, request: Request) -> Response:
        _only(request, "limit")
        limit = parse_limit(
            request.query_params.get("limit"), api_openapi.DEFAULT_STALLS, api_openapi.MAX_STALLS
        )
        pool = await self.pool()
        rows = await asyncio.wait_for(api.stalled(pool, limit, failed=True), READ_TIMEOUT)
        return _json(api_json.stall_json(rows))

    async def pipeline(self, request: Request) -> Response:
        _only(request)
        return _json(self.spec.to_dict())

    async def overview(self, request: Request) -> Response:
        _only(request, "since", "samples")
        now = datetime.now(UTC)
        raw = request.query_params.get("since")
        since = parse_time("since", raw, now) if raw else now - timedelta(hours=1)
        samples = _flag(request, "samples")
        pool = await self.pool()
        counts, funnel, latencies, stalled = await asyncio.wait_for(
            asyncio.gather(
                api.state_counts(pool, since),
                api.funnel(pool, since, spec=self.spec),
                api.hop_latencies(pool, since, limit=LATENCY_SAMPLES, spec=self.spec),
                listing.stalled_counts(pool),
            ),
            READ_TIMEOUT,
        )
        return _json(
            {
                "since": since.isoformat(),
                "state_counts": counts,
                "funnel": funnel,
                "hop_latencies": {
                    step: api_json.latency_json(lat, samples) for step, lat in latencies.items()
                },
                "stalled_counts": stalled,
            }
        )

    async def alerts(self, request: Request) -> Response:
        _only(request, "status", "limit")
        status = request.query_params.get("status") or None
        if status not in (None, "firing", "resolved"):
            raise BadQuery(f"unknown status {status!r}: use firing or resolved")
        limit = parse_limit(request.query_params.get("limit"), 200, 1000)
        pool = await self.pool()
        rows = await asyncio.wait_for(api.alerts(pool, status, limit), READ_TIMEOUT)
        return _json([api_json.alert_json(a) for a in rows])

    async def aclose(self) -> None:
        """Close the read clients this event loop opened (lookups, the pool)."""
        await api.close()


def mount(
    app: Starlette, settings: Settings, spec: PipelineSpec, authorized: Authorized
) -> ReadApi:
    """Add the read API's routes to ``app`` (the collector's OTLP/HTTP app)."""
    read_api = ReadApi(settings, spec, authorized)
    app.router.routes.extend(read_api.routes())
    return read_api
