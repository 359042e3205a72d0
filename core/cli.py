"""The `hoptrace` command line. Each command is a thin shell over a component's library call;
the components live in ``hoptrace.instrumentation|workers|collector|dashboard``.

Exit codes: 0 success, 1 internal failure, 2 bad input or a part that is not available.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

import typer

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
app.add_typer(dev_app, name="dev")
app.add_typer(topics_app, name="topics")
app.add_typer(check_app, name="check")
app.add_typer(demo_app, name="demo")

DevName = Annotated[
    str | None, typer.Option("--dev-name", hidden=True, help="Set by `hoptrace dev`.")
]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"hoptrace: {message}", err=True)
    raise typer.Exit(code)


def _component(module: str, attr: str, issue: str) -> Callable[..., Any]:
    """Import a component's entry point; say clearly when it has not landed yet."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("hoptrace"):
            fail(f"not available yet: {module} is built by the issue '{issue}'")
        raise
    return getattr(mod, attr)


# ------------------------------------------------------------------------------------- dev


def _stack() -> Any:
    from hoptrace import devstack

    return devstack, devstack.StackConfig.from_env()


@dev_app.command("up")
def dev_up(
    infra_only: Annotated[
        bool, typer.Option("--infra-only", help="Only PostgreSQL and Kafka.")
    ] = False,
) -> None:
    """Start PostgreSQL, Kafka and hoptrace's services (idempotent; waits for real readiness)."""
    devstack, cfg = _stack()
    try:
        took = devstack.up(cfg, services=not infra_only, echo=typer.echo)
    except devstack.StackError as exc:
        fail(str(exc), 1)
    typer.echo(f"stack up in {took:.1f}s")


@dev_app.command("down")
def dev_down() -> None:
    """Stop what `dev up` started (by pid), and nothing else."""
    devstack, cfg = _stack()
    devstack.down(cfg, echo=typer.echo)


@dev_app.command("status")
def dev_status() -> None:
    """Each part: up, down (should run, does not: exit 3) or stopped (a service not started)."""
    devstack, cfg = _stack()
    any_down = False
    for st in devstack.status(cfg):
        any_down |= st.label == "down"
        typer.echo(f"{st.name:<18} {st.label:<7} pid {st.pid or '-':<8} port {st.port or '-'}")
    raise typer.Exit(3 if any_down else 0)


@dev_app.command("stop")
def dev_stop(name: str) -> None:
    """Stop one part of the local stack."""
    devstack, cfg = _stack()
    try:
        p = devstack.part(cfg, name)
    except devstack.StackError as exc:
        fail(str(exc))
    typer.echo(f"{name} {'stopped' if p.stop() else 'was not running'}")


@dev_app.command("start")
def dev_start(
    name: str,
    fault: Annotated[str | None, typer.Option("--fault", help="Fault switch (see README).")] = None,
) -> None:
    """Start one part of the local stack, optionally with a fault switch."""
    devstack, cfg = _stack()
    try:
        p = devstack.part(cfg, name)
        env = {"HOPTRACE_FAULT": fault} if fault else {"HOPTRACE_FAULT": ""}
        if fault:
            _component("hoptrace.workers.faults", "validate_fault", "reference pipeline")(
                name, fault
            )
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
    _component("hoptrace.collector.service", "main", "collector")()


@app.command("worker")
def worker(
    name: Annotated[
        str,
        typer.Argument(
            help="payment-service, purchase-worker, allocation-worker, session-worker, admin-service"
        ),
    ],
    fault: Annotated[
        str | None, typer.Option("--fault", envvar="HOPTRACE_FAULT", help="Fault switch.")
    ] = None,
    dev_name: DevName = None,
) -> None:
    """Run one service of the reference pipeline."""
    _component("hoptrace.workers.run", "main", "reference pipeline")(name, fault or None)


@app.command("dashboard")
def dashboard(
    port: Annotated[int | None, typer.Option(help="Default 8501.")] = None,
    dev_name: DevName = None,
) -> None:
    """Run the Streamlit dashboard on 127.0.0.1:8501."""
    _component("hoptrace.dashboard.serve", "main", "dashboard")(port)


@topics_app.command("ensure")
def topics_ensure() -> None:
    """Create the pipeline's topics and dead-letter topics from the spec (idempotent)."""
    _component("hoptrace.workers.topics", "ensure_cli", "reference pipeline")()


@app.command("migrate")
def migrate() -> None:
    """Apply the database migrations: the span store and the reference pipeline's tables."""
    import asyncio

    import asyncpg

    from hoptrace.settings import get_settings

    settings = get_settings()
    schema = _component("hoptrace.collector.schema", "migrate", "collector")
    parse = _component("hoptrace.contract", "parse_duration", "contract")

    async def store() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await schema(conn, parse(settings.retention))
        finally:
            await conn.close()

    try:
        asyncio.run(store())
    except (OSError, asyncpg.PostgresError) as exc:
        fail(f"cannot migrate the span store at {settings.database_url.split('@')[-1]}: {exc}", 1)
    typer.echo("span store: migrated")
    _component("hoptrace.workers.schema", "migrate_cli", "reference pipeline")()


@app.command("pay")
def pay(
    student: Annotated[str, typer.Option(help="Student id.")] = "student-1",
    course: Annotated[str, typer.Option(help="Course id.")] = "course-1",
    amount: Annotated[str, typer.Option(help="Amount.")] = "49.00",
) -> None:
    """Submit one payment; its id is the last line of stdout."""
    _component("hoptrace.workers.client", "pay_cli", "reference pipeline")(student, course, amount)


@demo_app.command("traffic")
def demo_traffic(
    rate: Annotated[float, typer.Option(help="Payments per second.")] = 5.0,
    count: Annotated[int, typer.Option(help="How many payments.")] = 20,
) -> None:
    """Drive load: COUNT payments at RATE per second."""
    _component("hoptrace.workers.client", "traffic_cli", "reference pipeline")(rate, count)


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
    _component("hoptrace.collector.trace_cli", "trace_cli", "diagnosis")(correlation_id, fmt.value)


@app.command("stalls")
def stalls(as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False) -> None:
    """Stalled correlations: step, overdue by, since when."""
    _component("hoptrace.collector.stalls_cli", "stalls_cli", "collector")(as_json)


@check_app.command("deploy")
def check_deploy(
    compose: Annotated[str, typer.Option("--compose", help="Compose file.")] = "docker-compose.yml",
) -> None:
    """Every step's service deployed and every topic created by the compose file."""
    _component("hoptrace.collector.deploy_check", "check_deploy_cli", "diagnosis")(compose)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
