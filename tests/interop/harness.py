"""Runs hoptrace's interop services (``interop/node``, ``interop/java``) as users run them: built
once by ``scripts/interop.sh``, started as a subprocess with their environment, ready when they
print ``READY``, stopped with SIGTERM. Their output (stdout and stderr) is kept as their log."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from hoptrace.settings import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "interop.sh"
INTEROP = PROJECT_ROOT / "interop"
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"

#: JVM options for a short-lived consumer under test: start-up over peak throughput.
JVM_FAST_START = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
#: service -> (working directory, command)
COMMANDS: dict[str, tuple[Path, list[str]]] = {
    "node": (INTEROP / "node", ["node", "worker.js"]),
    "java": (
        INTEROP / "java",
        [
            "java",
            # C1 only and the serial collector: the agent's start-up (it instruments every class
            # as it loads) takes a third of the time on a busy 2-core machine; spans unchanged
            *JVM_FAST_START,
            "-javaagent:target/agent/opentelemetry-javaagent.jar",
            "-jar",
            "target/session-consumer.jar",
        ],
    ),
}


class ServiceError(AssertionError):
    """A service did not build, start, get ready or stop as it should (its log is attached)."""


@functools.cache
def build() -> str:
    """Build (or reuse) every interop service once per test session; the script's output."""
    proc = subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, timeout=900, cwd=PROJECT_ROOT
    )
    if proc.returncode != 0:
        raise ServiceError(
            f"{SCRIPT.name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}".rstrip()
        )
    return proc.stdout


@dataclass(frozen=True)
class ServiceEnv:
    """What a service is told through its environment."""

    bootstrap: str
    database_url: str
    consume_topic: str
    group: str
    service_name: str
    otlp_endpoint: str
    otlp_protocol: str = "http/protobuf"
    emit_topic: str | None = None
    carrier: str | None = None
    fault: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        """The process environment: this machine's, minus any OTEL_* of the test run, plus ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(
            {
                "KAFKA_BOOTSTRAP": self.bootstrap,
                "DATABASE_URL": self.database_url,
                "CONSUME_TOPIC": self.consume_topic,
                "GROUP": self.group,
                "OTEL_SERVICE_NAME": self.service_name,
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": self.otlp_protocol,
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_LOGS_EXPORTER": "none",
                "OTEL_BSP_SCHEDULE_DELAY": "200",  # spans reach the receiver within a test
            }
        )
        for name, value in (
            ("EMIT_TOPIC", self.emit_topic),
            ("CARRIER", self.carrier),
            ("FAULT", self.fault),
        ):
            if value is not None:
                env[name] = value
        env.update(self.extra)
        return env


class Service:
    """One running interop service; a context manager that stops it (SIGTERM) on exit."""

    def __init__(self, name: str, env: ServiceEnv) -> None:
        if name not in COMMANDS:
            raise ValueError(f"unknown interop service {name!r} (known: {', '.join(COMMANDS)})")
        self.name = name
        self.env = env
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        cwd, cmd = COMMANDS[name]
        self._proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env.environ(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a ^C of the test run does not reach it first
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._lock:
                self._lines.append(line.rstrip("\n"))
            if line.strip() == "READY":
                self._ready.set()
        self._ready.set()  # end of output: wake a waiter (it checks whether READY came)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def log(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def _fail(self, what: str) -> ServiceError:
        return ServiceError(f"interop service {self.name}: {what}\n--- its log ---\n{self.log()}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the service printed READY; raises (with its log) on a timeout or an exit."""
        if not self._ready.wait(timeout):
            raise self._fail(f"not READY after {timeout}s")
        with self._lock:
            ready = "READY" in (line.strip() for line in self._lines)
        if not ready:
            self._reader.join(5)
            raise self._fail(f"exited with {self._proc.wait(5)} before READY")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit; SIGKILL (and raise) when it does not exit in time."""
        if self.returncode is not None:
            return self.returncode
        if self.alive():
            self._proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self.returncode = self._proc.wait(10)
            self._reader.join(5)
            raise self._fail(f"did not exit within {timeout}s of SIGTERM (killed)") from None
        self._reader.join(5)
        return self.returncode

    def save_log(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.log() + "\n")
        return path

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            try:
                self.stop()
            except ServiceError:
                if exc[0] is None:
                    raise


def start(name: str, env: ServiceEnv, ready_timeout: float = 90.0) -> Service:
    """Build if needed, start ``name`` and wait for READY (stopping it if it never gets ready)."""
    build()
    service = Service(name, env)
    try:
        service.wait_ready(ready_timeout)
    except BaseException:
        if service.alive():
            service._proc.kill()
            service._proc.wait(10)
        raise
    return service
