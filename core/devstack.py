"""The local stack without Docker: a private PostgreSQL cluster and a real Apache Kafka broker
(KRaft), Jaeger when its binary has been built, plus hoptrace's own processes (the collector,
the reference services of :mod:`hoptrace.workers.registry`, the dashboard), each with its own
log, pid file and readiness check. `hoptrace dev up|down|status|start|stop` is this module.

The jobs live in their own modules: where the stack lives (:mod:`.devstack_config`), process
management (:mod:`.devstack_process`), PostgreSQL (:mod:`.devstack_postgres`), Kafka
(:mod:`.devstack_kafka`) and Jaeger (:mod:`.devstack_jaeger`). Failures raise :class:`StackError` with one line that says
what is wrong and what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from hoptrace.settings import Settings
from hoptrace.workers.registry import SERVICES as WORKERS

from .devstack_config import STACK_FILES, StackConfig, StackError
from .devstack_jaeger import JaegerPart
from .devstack_kafka import KafkaBroker
from .devstack_postgres import PostgresServer
from .devstack_process import Part, PartStatus, ServicePart, stack_env, tail, work_dir

__all__ = [
    "INIT_STEPS",
    "STACK_FILES",
    "JaegerPart",
    "KafkaPart",
    "Part",
    "PartStatus",
    "PostgresPart",
    "ServicePart",
    "StackConfig",
    "StackError",
    "all_parts",
    "down",
    "infra_parts",
    "observability_parts",
    "part",
    "run_init",
    "service_parts",
    "status",
    "up",
]


class PostgresPart(PostgresServer):
    """The stack's PostgreSQL, part ``postgres``."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__("postgres", cfg)


class KafkaPart(KafkaBroker):
    """The stack's Kafka broker, part ``kafka`` (its data folder: ``<home>/kafka``)."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__("kafka", cfg)


def infra_parts(cfg: StackConfig) -> list[Part]:
    return [PostgresPart(cfg), KafkaPart(cfg)]


def service_parts(cfg: StackConfig) -> list[ServicePart]:
    """hoptrace's own processes in start order: the collector, the reference services, the
    dashboard. Ports come from the settings, so ``HOPTRACE_*_PORT`` moves them."""
    s = Settings()
    return [
        ServicePart("collector", cfg, ["collector"], port=s.otlp_http_port),
        *(ServicePart(w.name, cfg, ["worker", w.name], port=w.port(s)) for w in WORKERS.values()),
        ServicePart("dashboard", cfg, ["dashboard"], port=s.dashboard_port),
    ]


def observability_parts(cfg: StackConfig) -> list[Part]:
    """Jaeger (started by `dev up` when its binary has been built; not with --infra-only)."""
    return [JaegerPart(cfg)]


def all_parts(cfg: StackConfig) -> list[Part]:
    return [*infra_parts(cfg), *observability_parts(cfg), *service_parts(cfg)]


def part(cfg: StackConfig, name: str) -> Part:
    for p in all_parts(cfg):
        if p.name == name:
            return p
    known = ", ".join(p.name for p in all_parts(cfg))
    raise StackError(f"unknown part {name!r}; known parts: {known}")


#: One-shot steps run after the infrastructure is up and before the services start:
#: (name, `hoptrace` arguments).
INIT_STEPS: list[tuple[str, list[str]]] = [
    ("migrate", ["migrate"]),
    ("topics", ["topics", "ensure"]),
]


def run_init(cfg: StackConfig, echo: Callable[[str], None] = print) -> None:
    """Migrations and topics, as `hoptrace migrate` / `hoptrace topics ensure` (idempotent)."""
    env = {**os.environ, **stack_env(cfg)}
    cfg.logs.mkdir(parents=True, exist_ok=True)
    for name, args in INIT_STEPS:
        log = cfg.logs / f"init-{name}.log"
        with open(log, "wb") as out:
            res = subprocess.run(
                [sys.executable, "-m", "hoptrace.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(work_dir(cfg)),
            )
        if res.returncode != 0:
            raise StackError(f"`hoptrace {' '.join(args)}` failed; see {log} ({tail(log, 2)})")
        echo(f"{name:<18} done        log {log}")


def up(cfg: StackConfig, *, services: bool = True, echo: Callable[[str], None] = print) -> float:
    """Start every part that is not running (idempotent). Returns seconds taken."""
    t0 = time.monotonic()

    def start(p: Part) -> None:
        t = time.monotonic()
        verb = "started" if p.start() else "already up"
        echo(
            f"{p.name:<18} {verb:<10} pid {p.pid()}  port {p.port or '-'}  "
            f"({time.monotonic() - t:.1f}s)  log {p.log_file}"
        )

    for p in infra_parts(cfg):
        start(p)
    if services:
        jaeger = JaegerPart(cfg)
        if jaeger.built:  # before the services: they export to it from their first span
            start(jaeger)
        else:
            echo(f"{jaeger.name:<18} skipped    (not built: `scripts/go-tools.sh jaeger`)")
        run_init(cfg, echo)  # migrations and topics before any service starts
        for p in service_parts(cfg):
            start(p)
        if jaeger.pid() is not None:
            echo(
                f"jaeger UI {cfg.jaeger_url}; for its links in `hoptrace trace`: "
                f"export HOPTRACE_JAEGER_URL={cfg.jaeger_url}"
            )
    return time.monotonic() - t0


def down(cfg: StackConfig, echo: Callable[[str], None] = print) -> None:
    """Stop what `up` started, by pid file, services first."""
    for p in reversed(all_parts(cfg)):
        if p.stop():
            echo(f"{p.name:<18} stopped")
        else:
            echo(f"{p.name:<18} not running")


def status(cfg: StackConfig) -> list[PartStatus]:
    return [p.status() for p in all_parts(cfg)]
