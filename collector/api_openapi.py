"""The read API's OpenAPI 3.1 document (``GET /api/v1/openapi.json``), kept by hand beside the
routes (``api_http``); a test checks that every route is in it and that the answers match its
schemas. Enumerations come from the contract, so the document names the codes the API returns.

The trace document is summarised here (its required fields); its full schema is
``docs/trace-json-schema.json`` (``version`` 1), linked from ``externalDocs``.
"""

from __future__ import annotations

from typing import Any

from hoptrace.contract import CAUSES, STATES, STATUSES, TRACE_SCHEMA_VERSION

from .api_query import DEFAULT_LIMIT, MAX_LIMIT

PREFIX = "/api/v1"
#: Most stalls ``GET /stalls`` returns, and its default.
MAX_STALLS = 1000
DEFAULT_STALLS = 100

_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_NTIME = {"type": ["string", "null"], "format": "date-time"}
_NNUM = {"type": ["number", "null"]}
_STATE = {"enum": list(STATES)}
_CAUSE = {"enum": list(CAUSES)}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return _json(_ref("Problem"), description)


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or _STR}  # fmt: skip


_TIME_HELP = "ISO 8601 (UTC without an offset) or a duration back from now: 15m, 6h, 7d."
_DENIED = {"401": _problem("Missing or wrong bearer token (HOPTRACE_INGEST_TOKEN).")}
_UNREADABLE = {"503": _problem("The store did not answer in time.")}

#: The trace document's required fields (as keyword names, the way ``render.to_dict`` spells
#: them: some are also contract words).
TRACE_REQUIRED = [
    *dict(version=1, correlation_id=1, pipeline=1, found=1, state=1, stopped_at=1, cause=1,
          summary=1, evidence=1, next_action=1, missing_evidence=1, checked_at=1, trace_ids=1,
          jaeger_urls=1, steps=1)
]  # fmt: skip

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"type": "string", "description": "What is wrong, for people."}},
    },
    "Trace": {
        "type": "object",
        "description": "The trace document, as `hoptrace trace --format json` prints it. "
        "With `spans=true` it also has `spans` (items: Span) and, in each step's `kafka`, "
        "`dlq_checked` (whether its dead-letter topic was scanned).",
        "required": TRACE_REQUIRED,
        "properties": {
            "version": {"const": TRACE_SCHEMA_VERSION},
            "correlation_id": _STR,
            "state": _STATE,
            "stopped_at": _NSTR,
            "cause": _CAUSE,
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "service", "status"],
                    "properties": {"id": _STR, "service": _STR, "status": {"enum": list(STATUSES)}},
                },
            },
            "spans": {"type": "array", "items": _ref("Span")},
        },
    },
    "Span": {
        "type": "object",
        "required": ["trace_id", "span_id", "name", "service", "start_time", "end_time", "step"],
        "properties": {
            "trace_id": _STR,
            "span_id": _STR,
            "parent_span_id": _NSTR,
            "name": _STR,
            "service": _STR,
            "kind": {"type": ["integer", "string", "null"]},
            "start_time": _TIME,
            "end_time": _NTIME,
            "status_code": {"type": "integer"},
            "status_message": _NSTR,
            "step": {**_NSTR, "description": "The step this span is a run of, if any."},
            "outcome": _NSTR,
        },
    },
    "Correlation": {
        "type": "object",
        "required": ["correlation_id", "state", "step", "service", "cause", "first_seen"],
        "properties": {
            "correlation_id": _STR,
            "pipeline": _NSTR,
            "state": _STATE,
            "step": {
                **_NSTR,
                "description": "Where it is: the step it failed at, or the step due "
                "next; null once completed.",
            },  # fmt: skip
            "service": {**_NSTR, "description": "The service of `step`."},
            "cause": {
                "type": ["string", "null"],
                "enum": [*CAUSES, None],
                "description": "The cause diagnosed for its latest alert.",
            },  # fmt: skip
            "last_step": _NSTR,
            "last_step_at": _NTIME,
            "next_deadline": _NTIME,
            "failed_at": _NTIME,
            "last_error": _NSTR,
            "first_seen": _TIME,
            "updated_at": _TIME,
            "completed_at": _NTIME,
        },
    },
    "CorrelationPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": _ref("Correlation")},
            "next_cursor": {
                **_NSTR,
                "description": "Pass as `cursor` for the next page; null on the last page.",
            },  # fmt: skip
        },
    },
    "Stall": {
        "type": "object",
        "required": ["correlation_id", "state", "step", "since", "overdue_by_seconds"],
        "properties": {
            "correlation_id": _STR,
            "pipeline": _NSTR,
            "state": _STATE,
            "step": _NSTR,
            "last_step": _NSTR,
            "since": _TIME,
            "overdue_by_seconds": {"type": "number"},
            "last_error": _NSTR,
        },
    },
    "Pipeline": {
        "type": "object",
        "description": "The pipeline spec (HOPTRACE_PIPELINE) as plain data.",
        "required": ["name", "correlation_key", "steps"],
        "properties": {
            "name": _STR,
            "correlation_key": _STR,
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "service", "consumes", "emits", "after", "deadline_s"],
                    "properties": {
                        "id": _STR,
                        "service": _STR,
                        "consumes": _NSTR,
                        "group": _NSTR,
                        "emits": _NSTR,
                        "after": {"type": "array", "items": _STR},
                        "deadline_s": {"type": "number"},
                    },
                },
            },
        },
    },
    "Hop": {
        "type": "object",
        "required": ["count", "p50", "p95", "p99"],
        "properties": {
            "count": {"type": "integer"},
            "p50": _NNUM,
            "p95": _NNUM,
            "p99": _NNUM,
            "samples": {"type": "array", "items": {"type": "number"}},
        },
    },
    "Overview": {
        "type": "object",
        "required": ["since", "state_counts", "funnel", "hop_latencies", "stalled_counts"],
        "properties": {
            "since": _TIME,
            "state_counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "funnel": {"type": "object", "additionalProperties": {"type": "integer"}},
            "hop_latencies": {"type": "object", "additionalProperties": _ref("Hop")},
            "stalled_counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "Alert": {
        "type": "object",
        "required": ["id", "correlation_id", "step", "status", "fired_at", "cause"],
        "properties": {
            "id": {"type": "integer"},
            "correlation_id": _STR,
            "pipeline": _NSTR,
            "step": _NSTR,
            "status": {"enum": ["firing", "resolved"]},
            "fired_at": _TIME,
            "resolved_at": _NTIME,
            "cause": {"type": ["string", "null"]},
            "evidence": _NSTR,
            "delivered_firing": {"type": "boolean"},
            "delivered_resolved": {"type": "boolean"},
            "attempts": {"type": "integer"},
            "last_error": _NSTR,
        },
    },
}


def _get(summary: str, params: list[dict[str, Any]], ok: dict[str, Any], **more: Any) -> Any:
    responses = {"200": ok, **more, **_DENIED}
    return {"get": {"summary": summary, "parameters": params, "responses": responses}}


_LIMIT = {"type": "integer", "minimum": 1}

PATHS: dict[str, Any] = {
    f"{PREFIX}/correlations/{{correlation_id}}": _get(
        "Where one payment stopped and why (the trace document).",
        [
            {"name": "correlation_id", "in": "path", "required": True, "schema": _STR},
            _query(
                "format",
                "json (default), text or markdown: as `hoptrace trace --format`.",
                {"enum": ["json", "text", "markdown"]},
            ),  # fmt: skip
            _query(
                "spans",
                "true: add the payment's spans, each with its step (a timeline).",
                {"type": "boolean"},
            ),  # fmt: skip
        ],
        {
            "description": "Found.",
            "content": {
                "application/json": {"schema": _ref("Trace")},
                "text/plain": {"schema": _STR},
                "text/markdown": {"schema": _STR},
            },
        },
        **{
            "400": _problem("Not a correlation id, or a bad parameter."),
            "404": _problem("No span, processed mark or effect row carries the id."),
            "503": _problem("The span store could not be read."),
        },
    ),
    f"{PREFIX}/correlations": _get(
        "Payments, newest first (first seen), filtered, a page at a time.",
        [
            _query("state", f"Any of (comma-separated): {', '.join(STATES)}."),
            _query(
                "step",
                "Where it is (comma-separated step ids): the step it failed at or "
                "the step due next.",
            ),  # fmt: skip
            _query("cause", "The cause of its latest alert (one cause code).", _CAUSE),
            _query("service", "Where it is, by service (comma-separated): the steps it runs."),
            _query("since", f"First seen at or after. {_TIME_HELP}"),
            _query("until", f"First seen before. {_TIME_HELP}"),
            _query(
                "limit",
                f"Rows per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT}).",
                {**_LIMIT, "maximum": MAX_LIMIT},
            ),  # fmt: skip
            _query("cursor", "The next_cursor of the previous page."),
        ],
        _json(_ref("CorrelationPage")),
        **{"400": _problem("A bad or unknown filter (the message names it)."), **_UNREADABLE},
    ),
    f"{PREFIX}/stalls": _get(
        "Stalled and failed payments, longest stuck first (as `hoptrace stalls --json`).",
        [
            _query(
                "limit",
                f"At most this many (default {DEFAULT_STALLS}).",
                {**_LIMIT, "maximum": MAX_STALLS},
            )
        ],  # fmt: skip
        _json({"type": "array", "items": _ref("Stall")}),
        **{"400": _problem("A bad limit."), **_UNREADABLE},
    ),
    f"{PREFIX}/pipeline": _get("The pipeline spec.", [], _json(_ref("Pipeline"))),
    f"{PREFIX}/overview": _get(
        "Counts by state, the funnel and per-hop latencies of the payments first seen since a "
        "time; stalled payments per step now.",
        [
            _query("since", f"Default 1h. {_TIME_HELP}"),
            _query(
                "samples",
                "true: each hop's latency samples too (a histogram).",
                {"type": "boolean"},
            ),  # fmt: skip
        ],
        _json(_ref("Overview")),
        **{"400": _problem("A bad parameter."), **_UNREADABLE},
    ),
    f"{PREFIX}/alerts": _get(
        "Alerts, newest first.",
        [
            _query(
                "status", "firing or resolved (default both).", {"enum": ["firing", "resolved"]}
            ),  # fmt: skip
            _query("limit", "At most this many (default 200).", {**_LIMIT, "maximum": 1000}),
        ],
        _json({"type": "array", "items": _ref("Alert")}),
        **{"400": _problem("A bad parameter."), **_UNREADABLE},
    ),
    f"{PREFIX}/openapi.json": {
        "get": {
            "summary": "This document (no token needed).",
            "security": [],
            "responses": {"200": _json({"type": "object"})},
        }
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hoptrace read API",
            "version": "1",
            "description": "Read-only: where payments are, why they stopped, what is stalled. "
            "Served by the collector beside OTLP/HTTP; every route but this document takes the "
            "ingest token as a bearer token when HOPTRACE_INGEST_TOKEN is set.",
        },
        "externalDocs": {
            "description": f"The trace document's full schema (version {TRACE_SCHEMA_VERSION}): "
            "docs/trace-json-schema.json in the hoptrace repository.",
            "url": "https://hoptrace.dev/schemas/trace-v1.json",
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
        "paths": PATHS,
    }
