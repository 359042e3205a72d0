"""The `hoptrace` command line. Each command is a thin shell over a component's library call;
the components live in ``hoptrace.instrumentation|workers|collector|dashboard``. A command
imports its component where it runs, so each command loads only what it uses.

Exit codes: 0 success, 1 internal failure, 2 bad input or an unknown part.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from typing import Annotated

import click
import typer
from typer.core import TyperCommand

app = typer.Typer(
    help="hoptrace: follow one payment through an event-driven Kafka pipeline, see where it stopped, and why.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dev_app = typer.Typer(
    help="The local stack without Docker: PostgreSQL, Kafka and hoptrace's services.",
    no_args_is_help=True,
)
topics_app = typer.Typer(help="Kafka topics of the pipeline.", no_args_is_help=True)
check_app = typer.Typer(help="Checks before you deploy.", no_args_is_help=True)
demo_app = typer.Typer(help="Demo traffic for the reference pipeline.", no_args_is_help=True)
spec_app = typer.Typer(help="The pipeline spec.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(topics_app, name="topics")
app.add_typer(check_app, name="check")
app.add_typer(demo_app, name="demo")
app.add_typer(spec_app, name="spec")

DevName = Annotated[
    str | None, typer.Option("--dev-name", hidden=True, help="Set by `hoptrace dev`.")
]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"hoptrace: {message}", err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"hoptrace {version('hoptrace')}")
        except PackageNotFoundError:  # run from a tree that was never installed
            from hoptrace import __version__

            typer.echo(f"hoptrace {__version__}")
        raise typer.Exit(0)


@app.callback()
def _refuse_placeholder_secrets(
    _version_flag: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Every command: a secret still holding the .env.example placeholder stops it (exit 2)."""
    from hoptrace.settings import PLACEHOLDER, placeholder_secrets

    if {"--help", "-h"} & set(sys.argv[1:]):
        return
    names = placeholder_secrets(os.environ)
    if names:
        fail(
            f"{', '.join(names)} still hold{'s' if len(names) == 1 else ''} the .env.example "
            f"placeholder ({PLACEHOLDER}...); set real secrets (in .env for docker compose)"
        )


# ------------------------------------------------------------------------------------- dev


@dev_app.command("up")
def dev_up(
    infra_only: Annotated[
        bool, typer.Option("--infra-only", help="Only PostgreSQL and Kafka.")
    ] = False,
) -> None:
    """Start PostgreSQL, Kafka and hoptrace's services (idempotent; waits for real readiness)."""
    from hoptrace import devstack

    cfg = devstack.StackConfig.from_env()
    try:
        took = devstack.up(cfg, services=not infra_only, echo=typer.echo)
    except devstack.StackError as exc:
        fail(str(exc), 1)
    typer.echo(f"stack up in {took:.1f}s")


@dev_app.command("down")
def dev_down() -> None:
    """Stop what `dev up` started (by pid), and nothing else."""
    from hoptrace import devstack

    cfg = devstack.StackConfig.from_env()
    devstack.down(cfg, echo=typer.echo)


@dev_app.command("status")
def dev_status() -> None:
    """Each part: up, down (should run, does not: exit 3) or stopped (a service not started)."""
    from hoptrace import devstack

    cfg = devstack.StackConfig.from_env()
    any_down = False
    for st in devstack.status(cfg):
        any_down |= st.label == "down"
        typer.echo(f"{st.name:<18} {st.label:<7} pid {st.pid or '-':<8} port {st.port or '-'}")
    raise typer.Exit(3 if any_down else 0)


class _DevPartCommand(TyperCommand):
    """`hoptrace dev start|stop`: the help lists the parts (NAME) and each service's fault
    switches (--fault), read from the stack and the registry only when the help is shown."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from hoptrace import devstack
        from hoptrace.workers.registry import FAULTS

        parts = ", ".join(p.name for p in devstack.all_parts(devstack.StackConfig.from_env()))
        faults = "; ".join(f"{name}: {', '.join(values)}" for name, values in FAULTS.items())
        for param in self.params:
            if param.name == "name":
                param.help = f"One of: {parts}."  # type: ignore[attr-defined]
            elif param.name == "fault":
                param.help = f"Fault switch, per service: {faults}."  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)


PartName = Annotated[str, typer.Argument(help="A part of the local stack.")]


@dev_app.command("stop", cls=_DevPartCommand)
def dev_stop(name: PartName) -> None:
    """Stop one part of the local stack."""
    from hoptrace import devstack

    cfg = devstack.StackConfig.from_env()
    try:
        p = devstack.part(cfg, name)
    except devstack.StackError as exc:
        fail(str(exc))
    typer.echo(f"{name} {'stopped' if p.stop() else 'was not running'}")


@dev_app.command("start", cls=_DevPartCommand)
def dev_start(
    name: PartName,
    fault: Annotated[str | None, typer.Option("--fault", help="Fault switch (see README).")] = None,
) -> None:
    """Start one part of the local stack, optionally with a fault switch."""
    from hoptrace import devstack
    from hoptrace.workers.registry import validate_fault

    cfg = devstack.StackConfig.from_env()
    try:
        p = devstack.part(cfg, name)
        env = {"HOPTRACE_FAULT": fault} if fault else {"HOPTRACE_FAULT": ""}
        if fault:
            validate_fault(name, fault)
        if fault and p.pid() is not None:
            p.stop()
        started = p.start(env)
    except devstack.StackError as exc:
        fail(str(exc), 1)
    except ValueError as exc:
        fail(str(exc))
    suffix = f" with fault {fault}" if fault else ""
    typer.echo(f"{name} {'started' if started else 'already running'}{suffix} (pid {p.pid()})")


# ------------------------------------------------------------------------------------- run


@app.command("collector")
def collector(dev_name: DevName = None) -> None:
    """Run the collector: OTLP gRPC 4317 / HTTP 4318, span store, stall detection, alerts."""
    from hoptrace.collector.service import main
    from hoptrace.repair.http import routes

    main(extra_routes=routes())  # POST /redrive, only with HOPTRACE_REDRIVE_TOKEN set


class _WorkerCommand(TyperCommand):
    """`hoptrace worker`: the help of NAME lists the services of the registry, read only when
    the help is shown (importing the services would slow every other command down)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from hoptrace.workers.registry import SERVICES

        for param in self.params:
            if param.name == "name":
                param.help = ", ".join(SERVICES)  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)


@app.command("worker", cls=_WorkerCommand)
def worker(
    name: Annotated[str, typer.Argument(help="A service of the reference pipeline.")],
    fault: Annotated[
        str | None, typer.Option("--fault", help="Fault switch (default: HOPTRACE_FAULT).")
    ] = None,
    dev_name: DevName = None,
) -> None:
    """Run one service of the reference pipeline."""
    from hoptrace.workers.run import main

    main(name, fault or None)


@app.command("dashboard")
def dashboard(
    port: Annotated[int | None, typer.Option(help="Default 8501.")] = None,
    dev_name: DevName = None,
) -> None:
    """Run the Streamlit dashboard on 127.0.0.1:8501."""
    from hoptrace.dashboard.serve import main

    main(port)


@topics_app.command("ensure")
def topics_ensure() -> None:
    """Create the pipeline's topics and dead-letter topics from the spec (idempotent)."""
    from hoptrace.workers.topics import ensure_cli

    ensure_cli()


@app.command("migrate")
def migrate(
    span_store_only: Annotated[
        bool,
        typer.Option(
            "--span-store-only",
            help="Only the span store (the collector's tables), not the reference pipeline's.",
        ),
    ] = False,
) -> None:
    """Apply the database migrations: the span store and the reference pipeline's tables."""
    import asyncio

    import asyncpg

    from hoptrace.collector.schema import migrate as migrate_store
    from hoptrace.contract import parse_duration
    from hoptrace.repair.audit import ensure as ensure_redrives
    from hoptrace.settings import get_settings

    if not span_store_only:
        from hoptrace.workers.schema import migrate_cli

    settings = get_settings()

    async def store() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await migrate_store(conn, parse_duration(settings.retention))
            await ensure_redrives(conn)
        finally:
            await conn.close()

    try:
        asyncio.run(store())
    except (OSError, asyncpg.PostgresError) as exc:
        fail(f"cannot migrate the span store at {settings.database_url.split('@')[-1]}: {exc}", 1)
    typer.echo("span store: migrated")
    if not span_store_only:
        migrate_cli()


@app.command("pay")
def pay(
    student: Annotated[str, typer.Option(help="Student id.")] = "student-1",
    course: Annotated[str, typer.Option(help="Course id.")] = "course-1",
    amount: Annotated[str, typer.Option(help="Amount.")] = "49.00",
) -> None:
    """Submit one payment; its id is the last line of stdout."""
    from hoptrace.workers.client import pay_cli

    pay_cli(student, course, amount)


@demo_app.command("traffic")
def demo_traffic(
    rate: Annotated[float, typer.Option(help="Payments per second.")] = 5.0,
    count: Annotated[int, typer.Option(help="How many payments.")] = 20,
) -> None:
    """Drive load: COUNT payments at RATE per second."""
    from hoptrace.workers.client import traffic_cli

    traffic_cli(rate, count)


# ------------------------------------------------------------------------------------- read


class TraceFormat(StrEnum):
    text = "text"
    json = "json"
    markdown = "markdown"


@app.command("trace")
def trace(
    correlation_id: Annotated[str, typer.Argument(metavar="ID", help="Payment (correlation) id.")],
    fmt: Annotated[
        TraceFormat, typer.Option("--format", help="text, json or markdown.")
    ] = TraceFormat.text,
) -> None:
    """Where did this payment stop, and why (with evidence)."""
    from hoptrace.collector.trace_cli import trace_cli

    trace_cli(correlation_id, fmt.value)


class RedriveFormat(StrEnum):
    text = "text"
    json = "json"


@app.command("redrive")
def redrive(
    correlation_id: Annotated[
        str | None, typer.Argument(metavar="[ID]", help="Payment (correlation) id.")
    ] = None,
    stuck: Annotated[bool, typer.Option("--stuck", help="Every stuck payment.")] = False,
    step: Annotated[str | None, typer.Option("--step", help="With --stuck: stuck at S.")] = None,
    cause: Annotated[
        str | None, typer.Option("--cause", help="Only payments with cause C.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="With --stuck: stuck within, e.g. 1h.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most N payments.")] = 100,
    apply_: Annotated[bool, typer.Option("--apply", help="Do it (default: dry run).")] = False,
    fmt: Annotated[
        RedriveFormat, typer.Option("--format", help="text or json.")
    ] = RedriveFormat.text,
    who: Annotated[str | None, typer.Option("--who", help="Recorded in the audit.")] = None,
) -> None:
    """Send stuck payments on from where they stopped (dry run unless --apply)."""
    from hoptrace.repair.cli import redrive_cli

    redrive_cli(correlation_id, stuck, step, cause, since, limit, apply_, fmt.value, who)


@app.command("stalls")
def stalls(as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False) -> None:
    """Stuck correlations (stalled and failed): state, step, stuck for, since when."""
    from hoptrace.collector.stalls_cli import stalls_cli

    stalls_cli(as_json)


@check_app.command("deploy")
def check_deploy(
    compose: Annotated[str, typer.Option("--compose", help="Compose file.")] = "docker-compose.yml",
) -> None:
    """Every step's service deployed and every topic created by the compose file."""
    from hoptrace.collector.deploy_check import check_deploy_cli
    from hoptrace.workers.faults import GROUP_FAULTS

    check_deploy_cli(compose, GROUP_FAULTS)


@spec_app.command("discover")
def spec_discover(
    since: Annotated[str, typer.Option("--since", help="How far back, e.g. 30m, 1h, 2d.")] = "1h",
    limit: Annotated[
        int, typer.Option("--limit", help="Spans each of its two queries looks at, at most.")
    ] = 20_000,
) -> None:
    """Propose a pipeline spec (TOML on stdout) from the spans already stored."""
    from hoptrace.collector.discover_cli import discover_cli

    discover_cli(since, limit)


def _setup_error(exc: Exception) -> str | None:
    """One line for an error of the set-up rather than of the program (a missing or malformed
    pipeline spec, Kafka settings that cannot work, a malformed ``HOPTRACE_*`` variable)."""
    from pydantic import ValidationError

    from hoptrace.contract import SpecError
    from hoptrace.settings import KafkaConfigError

    if isinstance(exc, SpecError | KafkaConfigError):  # e.g. HOPTRACE_PIPELINE unset
        return str(exc)
    if isinstance(exc, ValidationError):
        return "invalid setting: " + "; ".join(
            f"HOPTRACE_{str(e['loc'][0]).upper()}: {e['msg']}" if e.get("loc") else e["msg"]
            for e in exc.errors()
        )
    return None


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        line = _setup_error(exc)
        if line is None:
            raise
        typer.echo(f"hoptrace: {line}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
