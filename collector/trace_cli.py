"""`hoptrace trace ID --format text|json|markdown`: exit 0 when the correlation was found, 2 for
a malformed or unknown id (or no pipeline spec), 1 for an internal failure (e.g. the span store
cannot be read). With ``--format json`` a correlation that was not found still prints its
document (``"found": false``, with the missing evidence), so a script reads one format.
Everything printed is printable: the rendered diagnosis (see ``render``) and the error messages,
which may quote the typed id or a server's error text (``render.printable``).

With ``HOPTRACE_API_URL`` set the lookup runs on the collector (``GET /api/v1/correlations/ID``)
and is printed as it answers: the same output, no database or Kafka credentials needed here."""

from __future__ import annotations

import asyncio
import traceback

import typer

from hoptrace.contract import SpecError
from hoptrace.settings import get_settings

from . import api, api_json
from .api_client import ApiError, ReadApiClient, api_url
from .diagnosis import Diagnosis
from .render import printable, render

FORMATS = ("text", "json", "markdown")


async def _lookup(cid: str) -> Diagnosis:
    try:
        return await api.diagnose(cid)
    finally:
        await api.close()


def _fail(message: str, code: int) -> None:
    typer.echo(printable(f"hoptrace: {message}"), err=True)
    raise typer.Exit(code)


def _through_api(correlation_id: str, fmt: str) -> None:
    try:
        with ReadApiClient.from_env() as client:
            out = client.trace(correlation_id, fmt)
    except ApiError as exc:
        # 400 malformed, 404 unknown: bad input; anything else is a failure
        _fail(exc.detail, 2 if exc.status in (400, 404) else 1)
    typer.echo(out)


def trace_cli(correlation_id: str, fmt: str = "text") -> None:
    if fmt not in FORMATS:
        _fail(f"unknown format {fmt!r}: use text, json or markdown", 2)
    try:
        api.validate_id(correlation_id)
    except api.MalformedId as exc:
        _fail(str(exc), 2)
    if api_url() is not None:
        _through_api(correlation_id, fmt)
        return
    try:
        diagnosis = asyncio.run(_lookup(correlation_id))
    except SpecError as exc:  # e.g. HOPTRACE_PIPELINE unset outside a checkout
        _fail(str(exc), 2)
    except Exception as exc:  # noqa: BLE001 - reported, exit 1
        lines = traceback.format_exc().splitlines()
        typer.echo("\n".join(map(printable, lines)), err=True)
        _fail(
            f"internal failure while diagnosing {correlation_id!r}: {type(exc).__name__}: {exc}", 1
        )
    if not diagnosis.found:
        if fmt == "json":  # the document of a correlation not found: a script reads one format
            typer.echo(render(diagnosis, fmt, get_settings().jaeger_url))
        status, message = api_json.not_found_reason(diagnosis)
        _fail(message, 1 if status == 503 else 2)
    typer.echo(render(diagnosis, fmt, get_settings().jaeger_url))
