"""``hoptrace redrive ID`` / ``hoptrace redrive --stuck [--step S] [--cause C] [--since 1h]
[--limit N]``: a dry run by default (what it would send, from where, to which topic, which
processed mark it removes); ``--apply`` does it and prints a summary; ``--format json`` for
scripts.

Exit codes: 0 everything asked was done or had nothing to do; 2 bad input (a malformed or
unknown id, an unknown step or cause, a bad ``--since``); 1 a failure or a refusal, with what
was and was not done.
"""

from __future__ import annotations

import asyncio
import json

import typer

from hoptrace.contract import RedriveResult, parse_duration

from .plan import Kind
from .runner import Ask, BadInput, Report, run


def to_text(report: Report) -> str:
    """The report for a person: one block per payment, then the summary."""
    mode = "applied" if report.applied else "dry run (nothing sent; --apply to do it)"
    lines = [f"redrive: {mode}"]
    for p in report.payments:
        where = f" at {p.stopped_at}" if p.stopped_at else ""
        lines.append("")
        lines.append(f"{p.correlation_id}  {p.state or '?'}  cause {p.cause or '?'}{where}")
        if p.error:
            lines.append(f"  FAILED: {p.error}")
        done = {id(r.action): r for r in p.applied}
        for a in p.actions:
            r = done.get(id(a))
            if r is None:
                verb = "would " if a.kind.sends else ""
                mark = "REFUSED: " if a.kind == Kind.REFUSE else ""
                lines.append(f"  {a.step}: {mark}{verb}{a.describe()}")
                continue
            if r.result == RedriveResult.SENT:
                assert r.sent is not None and a.record is not None
                topic, part, off = r.sent
                text = f"sent {a.record.where} as {topic}[{part}]@{off}"
                if r.detail:
                    text += f"; {r.detail}"
                text += f" (redrive #{r.audit_id}, trace {r.trace_id})"
            elif r.result == RedriveResult.FAILED:
                text = f"FAILED: {a.describe()}: {r.detail}"
            elif a.kind == Kind.REFUSE:
                text = f"REFUSED: {a.reason}"
            else:
                text = a.reason
            lines.append(f"  {a.step}: {text}")
    c = report.counts()
    lines.append("")
    sent = f"{c[RedriveResult.SENT]} sent" if report.applied else f"{c['would_send']} to send"
    lines.append(
        f"{c['payments']} payment(s): {sent}, {c['nothing_to_do']} with nothing to do, "
        f"{c[RedriveResult.REFUSED]} refused, {c[RedriveResult.FAILED]} failed"
    )
    return "\n".join(lines)


def redrive_cli(
    correlation_id: str | None,
    stuck: bool,
    step: str | None,
    cause: str | None,
    since: str | None,
    limit: int,
    apply_: bool,
    fmt: str,
    who: str | None,
) -> None:
    """The command's body (``core/cli.py`` declares its options)."""
    try:
        window = parse_duration(since) if since else None
    except ValueError as exc:
        typer.echo(f"hoptrace: --since: {exc}", err=True)
        raise typer.Exit(2) from None
    ask = Ask(
        ids=(correlation_id,) if correlation_id else (),
        stuck=stuck,
        step=step,
        cause=cause,
        since=window,
        limit=limit,
    )
    try:
        report = asyncio.run(run(ask, apply_=apply_, who=who))
    except BadInput as exc:
        typer.echo(f"hoptrace: {exc}", err=True)
        raise typer.Exit(2) from None
    except (OSError, Exception) as exc:  # noqa: BLE001 - the store or Kafka unreachable
        typer.echo(f"hoptrace: redrive failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    if correlation_id and report.payments and not report.payments[0].found:
        typer.echo(f"hoptrace: unknown id {correlation_id!r}: nothing carries it", err=True)
        raise typer.Exit(2)
    if fmt == "json":
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(to_text(report))
    raise typer.Exit(report.exit_code)
