"""The local stack's process management: a :class:`Part` is one process the stack starts (by
pid file, with its own log), checks for readiness and stops (its whole process group, SIGTERM
then SIGKILL) without ever touching a process it did not start; a :class:`ServicePart` is one of
hoptrace's own processes (`hoptrace <args>`), ready when it touches its ready file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hoptrace.settings import IN_CHECKOUT, PACKAGED_SPEC, PROJECT_ROOT, Settings

from .devstack_config import KAFKA_SASL_USER, StackConfig, StackError

# --------------------------------------------------------------------------------------------
# small helpers


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a log, on one line (for an error message)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# --------------------------------------------------------------------------------------------
# parts


@dataclass
class PartStatus:
    name: str
    pid: int | None
    port: int | None
    up: bool
    detail: str = ""
    expected: bool = True  # infrastructure, or a service `dev up`/`dev start` started (pid file)

    @property
    def label(self) -> str:
        """up; down (should run but does not); stopped (a service nobody started)."""
        if self.up:
            return "up"
        return "down" if self.expected else "stopped"


@dataclass
class Part:
    """A process the stack starts: it knows how to prepare, start and check itself."""

    name: str
    cfg: StackConfig
    port: int | None = None
    marker: str = ""  # a string its command line must contain for a pid to count as ours
    env: dict[str, str] = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM

    @property
    def pid_file(self) -> Path:
        return self.cfg.run / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.cfg.logs / f"{self.name}.log"

    def pid(self) -> int | None:
        """Our recorded pid, if that process is still alive and still ours."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        if self.marker and self.marker not in _cmdline(pid):
            return None  # the pid was reused by someone else's process
        return pid

    def prepare(self) -> None:  # install / initialise, idempotent
        pass

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def spawn_user(self) -> str | None:
        return None

    def status(self) -> PartStatus:
        pid = self.pid()
        up = pid is not None and self.ready()
        return PartStatus(self.name, pid, self.port, up)

    def start(self, extra_env: dict[str, str] | None = None) -> bool:
        """Start if not running. Returns True if this call started it."""
        if self.pid() is not None:
            self._await_ready()
            return False
        if self.port is not None and port_open(self.port):
            raise StackError(
                f"{self.name}: port {self.port} is already taken by a process hoptrace did not "
                f"start; stop it or free the port, then run `hoptrace dev up` again"
            )
        self.prepare()
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        self.cfg.run.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, **(extra_env or {})}
        cmd = self.command()
        user = self.spawn_user()
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        with open(self.log_file, "ab") as log:
            log.write(
                f"\n--- start {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n".encode()
            )
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                cwd=str(work_dir(self.cfg)),
            )
        self.pid_file.write_text(str(proc.pid))
        self._await_ready(proc)
        return True

    def _await_ready(self, proc: subprocess.Popen | None = None) -> None:
        def check() -> bool:
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{self.name} exited with code {proc.returncode} while starting; "
                    f"see {self.log_file} ({tail(self.log_file, 3)})"
                )
            return self.ready()

        if not wait(check, self.cfg.timeout, 0.25):
            raise StackError(
                f"{self.name} did not become ready within {self.cfg.timeout:.0f}s; see {self.log_file}"
            )

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop our process (by pid, SIGTERM then SIGKILL). Returns True if something was stopped."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        try:
            os.killpg(pid, self.stop_signal)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, self.stop_signal)
        if not wait(lambda: not pid_alive(pid), timeout, 0.1):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait(lambda: not pid_alive(pid), 5, 0.1)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> bool:
        """SIGKILL, no grace (failure injection)."""
        pid = self.pid()
        if pid is None:
            return False
        os.killpg(pid, signal.SIGKILL)
        wait(lambda: not pid_alive(pid), 10, 0.05)
        return True


def work_dir(cfg: StackConfig) -> Path:
    """Where the stack's processes run: the checkout (relative spec paths keep working), or
    the stack's folder for an installed package."""
    return PROJECT_ROOT if IN_CHECKOUT else cfg.home


def stack_env(cfg: StackConfig) -> dict[str, str]:
    """The database and broker a process of this stack talks to: the stack's own (a private
    stack, with another ``HOPTRACE_HOME`` and ports, points its processes at itself), unless
    ``HOPTRACE_DATABASE_URL`` / ``HOPTRACE_KAFKA_BOOTSTRAP`` name others. The dashboard's
    read-only URL is the stack's read-only role while the database is the stack's; with another
    database it must be given too (the dashboard refuses to start without it).

    Also, each unless set already: the broker's SASL listener and its SCRAM login when the stack
    has one (``HOPTRACE_DEV_KAFKA_SASL_PORT``); the collector's OTLP endpoint for the services'
    export (``HOPTRACE_OTLP_GRPC_PORT`` moves it); the stack's Jaeger, when it runs, as a second
    export endpoint and the target of trace links; the reference spec shipped in the package
    when this is no checkout (the stack runs the reference pipeline)."""
    s = Settings()
    given = s.model_fields_set
    env = {
        "HOPTRACE_DATABASE_URL": s.database_url if "database_url" in given else cfg.database_url,
        "HOPTRACE_KAFKA_BOOTSTRAP": (
            s.kafka_bootstrap if "kafka_bootstrap" in given else cfg.kafka_bootstrap
        ),
    }
    if s.dashboard_database_url:
        env["HOPTRACE_DASHBOARD_DATABASE_URL"] = s.dashboard_database_url
    elif env["HOPTRACE_DATABASE_URL"] == cfg.database_url:  # this stack's own database
        env["HOPTRACE_DASHBOARD_DATABASE_URL"] = cfg.readonly_database_url
    sasl_password = cfg.kafka_sasl_password()
    if cfg.kafka_sasl_bootstrap and sasl_password and "kafka_bootstrap" not in given:
        env |= {
            "HOPTRACE_KAFKA_BOOTSTRAP": cfg.kafka_sasl_bootstrap,
            "HOPTRACE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "HOPTRACE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "HOPTRACE_KAFKA_SASL_USERNAME": KAFKA_SASL_USER,
            "HOPTRACE_KAFKA_SASL_PASSWORD": sasl_password,
        }
    otlp = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip().lower()
    if not any(os.environ.get(k) for k in otlp) and protocol == "grpc":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{s.otlp_grpc_port}"
    from .devstack_jaeger import JaegerPart  # (it is a Part of this module)

    if JaegerPart(cfg).pid() is not None:
        if "jaeger_url" not in given:
            env["HOPTRACE_JAEGER_URL"] = cfg.jaeger_url
        if not os.environ.get("HOPTRACE_EXPORT_ALSO"):
            env["HOPTRACE_EXPORT_ALSO"] = cfg.jaeger_otlp_endpoint
    if not IN_CHECKOUT and "pipeline_file" not in given:
        env["HOPTRACE_PIPELINE"] = str(PACKAGED_SPEC)
    return env


class ServicePart(Part):
    """A hoptrace process (`hoptrace <args>`): ready when it touches its ready file."""

    def __init__(
        self, name: str, cfg: StackConfig, args: Sequence[str], port: int | None = None
    ) -> None:
        super().__init__(name, cfg, port=port, marker=f"--dev-name={name}")
        self.args = list(args)

    @property
    def ready_file(self) -> Path:
        return self.cfg.run / f"{self.name}.ready"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "hoptrace.cli", *self.args, f"--dev-name={self.name}"]

    def start(self, extra_env: dict[str, str] | None = None) -> bool:
        if self.pid() is None:
            self.ready_file.unlink(missing_ok=True)
        env = {
            **stack_env(self.cfg),
            "HOPTRACE_READY_FILE": str(self.ready_file),
            # its spans are named after the part (a shell-wide OTEL_SERVICE_NAME would give
            # every service one name, and no step would match its spec's service)
            "OTEL_SERVICE_NAME": self.name,
            **(extra_env or {}),
        }
        return super().start(env)

    def ready(self) -> bool:
        return self.ready_file.exists()

    def status(self) -> PartStatus:
        st = super().status()
        st.expected = self.pid_file.exists()
        return st

    def stop(self, timeout: float = 20.0) -> bool:
        stopped = super().stop(timeout)
        self.ready_file.unlink(missing_ok=True)
        return stopped
