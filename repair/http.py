"""The redrive route the command line mounts on the collector's HTTP port (the collector package
never imports this): ``POST /redrive`` with ``{"id": "...", "apply": false, "who": "..."}`` and
``Authorization: Bearer <HOPTRACE_REDRIVE_TOKEN>``; the answer is ``hoptrace redrive --format
json``'s report. Without the token set, no route is mounted: the collector stays read-only toward
the pipeline. The token is its own (not the ingest token, not the dashboard's read-only role).

Answers: 200 the report (its ``exit_code`` says whether all was done), 400 bad input, 401 a
missing or wrong token, 404 an unknown id, 500 only when the redrive itself failed.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hoptrace.settings import RedriveSettings

PATH = "/redrive"


def _authorized(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header.removeprefix("Bearer ").strip().encode(), token.encode())


def routes(token: str | None = None) -> list[BaseRoute]:
    """The route, when a redrive token is configured (``HOPTRACE_REDRIVE_TOKEN``)."""
    token = token if token is not None else (RedriveSettings().redrive_token or "")
    if not token:
        return []
    from .runner import Ask, BadInput, run  # the collector loads the redrive side only here

    async def redrive(request: Request) -> Response:
        if not _authorized(request.headers.get("authorization"), token):
            return JSONResponse(
                {"message": "missing or invalid bearer token"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"message": "the body must be JSON"}, 400)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            return JSONResponse({"message": 'expected {"id": "<payment id>", "apply": bool}'}, 400)
        apply_ = body.get("apply", False)
        who = body.get("who") or "dashboard"
        if not isinstance(apply_, bool) or not isinstance(who, str) or len(who) > 200:
            return JSONResponse({"message": "'apply' must be true or false, 'who' a name"}, 400)
        try:
            report = await run(Ask(ids=(body["id"],)), apply_=apply_, who=who, close_api=False)
        except BadInput as exc:
            return JSONResponse({"message": str(exc)}, 400)
        except Exception as exc:  # noqa: BLE001 - the store or Kafka unreachable
            return JSONResponse({"message": f"{type(exc).__name__}: {exc}"}, 500)
        if report.payments and not report.payments[0].found:
            return JSONResponse({"message": f"unknown id {body['id']!r}"}, 404)
        return JSONResponse(report.to_dict())

    return [Route(PATH, redrive, methods=["POST"])]
