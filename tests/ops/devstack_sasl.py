"""A private local stack whose Kafka also listens with SASL_PLAINTEXT (SCRAM), started by the
real `hoptrace dev up` (PostgreSQL, Kafka, Jaeger, the collector with the Kafka span source, the
reference services, the dashboard) on free ports under its own ``HOPTRACE_HOME``: the shared
stack is never touched. Helpers to talk to it as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hoptrace import devstack
from hoptrace.settings import PROJECT_ROOT, KafkaSettings

from ..support import free_port, unique

#: Variables of the test run that must not leak into the private stack's processes.
_LEAKS = ("HOPTRACE_", "OTEL_")


@dataclass
class SaslStack:
    home: Path
    env: dict[str, str]  # what `hoptrace dev ...` runs with
    cfg: devstack.StackConfig
    span_topic: str

    @property
    def password(self) -> str:
        pw = self.cfg.kafka_sasl_password()
        assert pw, f"no SCRAM password in {self.cfg.kafka_sasl_password_file}"
        return pw

    def kafka(self, password: str | None = None, **changes: object) -> KafkaSettings:
        """Client settings for the SASL listener (``password`` overrides the right one)."""
        values: dict[str, object] = {
            "kafka_bootstrap": self.cfg.kafka_sasl_bootstrap,
            "kafka_security_protocol": "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": "hoptrace",
            "kafka_sasl_password": password or self.password,
        }
        return KafkaSettings(**{**values, **changes})

    def client_env(self, password: str | None = None, **extra: str) -> dict[str, str]:
        """A user's shell pointed at this stack through the SASL listener."""
        return {
            **self.env,
            "HOPTRACE_DATABASE_URL": self.cfg.database_url,
            "HOPTRACE_KAFKA_BOOTSTRAP": str(self.cfg.kafka_sasl_bootstrap),
            "HOPTRACE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "HOPTRACE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "HOPTRACE_KAFKA_SASL_USERNAME": "hoptrace",
            "HOPTRACE_KAFKA_SASL_PASSWORD": password or self.password,
            **extra,
        }

    def hoptrace(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hoptrace.cli", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log(self, part: str, lines: int = 40) -> str:
        path = self.cfg.logs / f"{part}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def sasl_stack(jar_cache: Path) -> Iterator[SaslStack]:
    """The private stack's folder and ports (nothing started: the tests run `dev up`)."""
    # under the project's ignored folder: the non-root PostgreSQL user must be able to reach it
    home = PROJECT_ROOT / ".hoptrace" / "test-stacks" / unique("sasl-")
    base = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKS)}
    ports = {
        name: str(free_port())
        for name in (
            "HOPTRACE_DEV_PG_PORT",
            "HOPTRACE_DEV_KAFKA_PORT",
            "HOPTRACE_DEV_CONTROLLER_PORT",
            "HOPTRACE_DEV_KAFKA_SASL_PORT",
            "HOPTRACE_DEV_JAEGER_PORT",
            "HOPTRACE_DEV_JAEGER_GRPC_PORT",
            "HOPTRACE_DEV_JAEGER_OTLP_PORT",
            "HOPTRACE_OTLP_GRPC_PORT",
            "HOPTRACE_OTLP_HTTP_PORT",
            "HOPTRACE_PAYMENT_SERVICE_PORT",
            "HOPTRACE_ADMIN_SERVICE_PORT",
            "HOPTRACE_DASHBOARD_PORT",
        )
    }
    span_topic = unique("hoptrace-spans-")
    env = {
        **base,
        **ports,
        "HOPTRACE_HOME": str(home),
        "HOPTRACE_DEV_CACHE": str(jar_cache),
        "HOPTRACE_DEV_TIMEOUT": "150",  # a busy 2-core machine
        "HOPTRACE_SPAN_TOPIC": span_topic,
        "HOPTRACE_STALL_SCAN_INTERVAL": "0.5",
    }
    old = os.environ.copy()
    try:  # StackConfig.from_env reads the same variables the `dev` commands get
        os.environ.clear()
        os.environ.update(env)
        cfg = devstack.StackConfig.from_env()
    finally:
        os.environ.clear()
        os.environ.update(old)
    stack = SaslStack(home, env, cfg, span_topic)
    try:
        yield stack
    finally:
        stack.hoptrace("dev", "down", timeout=180)
        shutil.rmtree(home, ignore_errors=True)


def socket_ports(pid: int) -> set[int]:
    """Remote ports of the TCP connections process ``pid`` holds (its socket inodes matched in
    /proc/net/tcp): which listener a client talks to."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[9] in inodes and cols[3] == "01":  # ESTABLISHED
                ports.add(int(cols[2].rsplit(":", 1)[1], 16))
    return ports
