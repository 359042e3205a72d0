"""The local stack without Docker: a private PostgreSQL cluster and a real Apache Kafka broker
(KRaft), plus hoptrace's own service processes, each with its own log, pid file and readiness check.

Everything lives under one ignored folder (``HOPTRACE_HOME``, default ``.hoptrace/``)::

    cache/kafka-<version>/libs   broker jars resolved by Maven from Maven Central (reused)
    pg/                          PostgreSQL data directory (owned by a non-root system user)
    kafka/                       KRaft log directory
    logs/<part>.log              one log file per part
    run/<part>.pid               pid files: `dev down` stops exactly these, nothing else

Failures raise :class:`StackError` with one line that says what is wrong and what to do.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hoptrace.settings import (
    LOCAL_KAFKA_CONTROLLER_PORT,
    LOCAL_KAFKA_PORT,
    LOCAL_PG_PORT,
    PROJECT_ROOT,
)

STACK_FILES = Path(__file__).resolve().parent / "stack"
KAFKA_VERSION = "4.1.1"
PG_SYSTEM_USER = "hoptrace"
PG_DB = "hoptrace"
PG_ROLE, PG_PASSWORD = "hoptrace", "hoptrace"
PG_RO_ROLE, PG_RO_PASSWORD = "hoptrace_ro", "hoptrace_ro"
#: A sibling file ``<folder>.initialising`` is written before we create a data folder and removed
#: once it is complete: a folder that still has one is a half-initialised folder of ours, which we
#: may remove and redo. Any other unexpected folder is left alone.


def _marker(folder: Path) -> Path:
    return folder.with_name(folder.name + ".initialising")


class StackError(RuntimeError):
    """One clear line: what is wrong and what to do."""


@dataclass(frozen=True)
class StackConfig:
    home: Path = PROJECT_ROOT / ".hoptrace"
    cache: Path | None = None
    pg_port: int = LOCAL_PG_PORT
    kafka_port: int = LOCAL_KAFKA_PORT
    controller_port: int = LOCAL_KAFKA_CONTROLLER_PORT
    timeout: float = 90.0

    @classmethod
    def from_env(cls) -> StackConfig:
        """``HOPTRACE_HOME`` moves the whole folder; ``HOPTRACE_DEV_*`` move ports and the jar cache
        (used by tests that run a second, private stack beside the shared one)."""
        env = os.environ
        home = Path(env.get("HOPTRACE_HOME", PROJECT_ROOT / ".hoptrace"))
        cache = Path(env["HOPTRACE_DEV_CACHE"]) if env.get("HOPTRACE_DEV_CACHE") else None
        return cls(
            home=home,
            cache=cache,
            pg_port=int(env.get("HOPTRACE_DEV_PG_PORT", LOCAL_PG_PORT)),
            kafka_port=int(env.get("HOPTRACE_DEV_KAFKA_PORT", LOCAL_KAFKA_PORT)),
            controller_port=int(
                env.get("HOPTRACE_DEV_CONTROLLER_PORT", LOCAL_KAFKA_CONTROLLER_PORT)
            ),
            timeout=float(env.get("HOPTRACE_DEV_TIMEOUT", 90)),
        )

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.home / "cache"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def database_url(self) -> str:
        return f"postgresql://{PG_ROLE}:{PG_PASSWORD}@127.0.0.1:{self.pg_port}/{PG_DB}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"


# --------------------------------------------------------------------------------------------
# small helpers


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
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


def _wait(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def _tail(path: Path, lines: int = 5) -> str:
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
        if not _pid_alive(pid):
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
        if self.port is not None and _port_open(self.port):
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
                cwd=str(PROJECT_ROOT),
            )
        self.pid_file.write_text(str(proc.pid))
        self._await_ready(proc)
        return True

    def _await_ready(self, proc: subprocess.Popen | None = None) -> None:
        def check() -> bool:
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{self.name} exited with code {proc.returncode} while starting; "
                    f"see {self.log_file} ({_tail(self.log_file, 3)})"
                )
            return self.ready()

        if not _wait(check, self.cfg.timeout, 0.25):
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
        if not _wait(lambda: not _pid_alive(pid), timeout, 0.1):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait(lambda: not _pid_alive(pid), 5, 0.1)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> bool:
        """SIGKILL, no grace (failure injection)."""
        pid = self.pid()
        if pid is None:
            return False
        os.killpg(pid, signal.SIGKILL)
        _wait(lambda: not _pid_alive(pid), 10, 0.05)
        return True


def _pg_bin() -> Path:
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / "pg_ctl").exists():
            return base
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise StackError(
        "PostgreSQL server binaries not found; run `make bootstrap` (installs Debian's postgresql) "
        "or `apt-get install postgresql`"
    )


class PostgresPart(Part):
    def __init__(self, cfg: StackConfig) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown (SIGTERM waits for every client to leave).
        super().__init__(
            "postgres", cfg, port=cfg.pg_port, marker="postgres", stop_signal=signal.SIGINT
        )

    @property
    def data(self) -> Path:
        return self.cfg.home / "pg"

    @property
    def sockets(self) -> Path:
        return self.cfg.home / "pg-run"

    def spawn_user(self) -> str | None:
        return PG_SYSTEM_USER if os.geteuid() == 0 else None

    def _as_user(self, cmd: Sequence[str]) -> list[str]:
        user = self.spawn_user()
        return ["runuser", "-u", user, "--", *cmd] if user else list(cmd)

    def _ensure_user(self) -> None:
        if os.geteuid() != 0:
            return
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    PG_SYSTEM_USER,
                ],
                check=True,
                capture_output=True,
            )

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            info = pwd.getpwnam(PG_SYSTEM_USER)
            os.chown(path, info.pw_uid, info.pw_gid)

    def prepare(self) -> None:
        bin_dir = _pg_bin()
        self._ensure_user()
        self.cfg.home.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(parents=True, exist_ok=True)
        self._chown(self.sockets)
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        marker = _marker(self.data)
        if (self.data / "PG_VERSION").exists() and not marker.exists():
            self._chown(self.data)
            stale = self.data / "postmaster.pid"
            if stale.exists():  # left by a killed server; pg_ctl would refuse otherwise
                try:
                    old = int(stale.read_text().splitlines()[0])
                except (OSError, ValueError, IndexError):
                    old = -1
                if old <= 0 or not _pid_alive(old):
                    stale.unlink()
            return
        if self.data.exists() and any(self.data.iterdir()) and not marker.exists():
            raise StackError(
                f"{self.data} exists but is not a complete PostgreSQL data folder hoptrace created; "
                f"move it away yourself (hoptrace will not delete it), then run `hoptrace dev up`"
            )
        marker.write_text("initdb in progress\n")
        if self.data.exists():
            shutil.rmtree(self.data)  # ours, half-initialised: redo it
        self.data.mkdir(parents=True)
        self._chown(self.data)
        pwfile = self.cfg.home / "pg-pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        self._chown(pwfile)
        log = self.cfg.logs / "postgres-initdb.log"
        with open(log, "wb") as out:
            res = subprocess.run(
                self._as_user(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        PG_ROLE,
                        f"--pwfile={pwfile}",
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        "--encoding=UTF8",
                        "--locale=C",
                    ]
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        pwfile.unlink(missing_ok=True)
        if res.returncode != 0:
            raise StackError(f"initdb failed; see {log} ({_tail(log, 2)})")
        conf = self.data / "postgresql.conf"
        with open(conf, "a") as f:
            f.write(
                "\n# hoptrace local stack\n"
                f"listen_addresses = '127.0.0.1'\nport = {self.cfg.pg_port}\n"
                f"unix_socket_directories = '{self.sockets}'\n"
                "max_connections = 300\nshared_buffers = 512MB\n"
                "synchronous_commit = off\nmax_wal_size = 2GB\n"
                "log_min_duration_statement = 2000\n"
            )
        marker.unlink()

    def command(self) -> list[str]:
        return [str(_pg_bin() / "postgres"), "-D", str(self.data)]

    def ready(self) -> bool:
        if not _port_open(self.cfg.pg_port):
            return False
        try:
            url = f"postgresql://{PG_ROLE}:{PG_PASSWORD}@127.0.0.1:{self.cfg.pg_port}/postgres"
            return asyncio.run(_pg_query(url, "SELECT 1")) == 1
        except Exception:
            return False

    def start(self, extra_env: dict[str, str] | None = None) -> bool:
        started = super().start(extra_env)
        self._ensure_roles()
        return started

    def _ensure_roles(self) -> None:
        """Create the read-only role (idempotent); the owner role and database come from initdb."""
        sql = f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{PG_RO_ROLE}') THEN
            CREATE ROLE {PG_RO_ROLE} LOGIN PASSWORD '{PG_RO_PASSWORD}';
          END IF;
        END $$;
        ALTER ROLE {PG_RO_ROLE} SET default_transaction_read_only = on;
        """  # noqa: S608 -- constants only
        base = f"postgresql://{PG_ROLE}:{PG_PASSWORD}@127.0.0.1:{self.cfg.pg_port}"

        async def run() -> None:
            import asyncpg

            conn = await asyncpg.connect(base + "/postgres")
            try:
                exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PG_DB)
                if not exists:
                    await conn.execute(f'CREATE DATABASE "{PG_DB}" OWNER {PG_ROLE}')
                await conn.execute(sql)
            finally:
                await conn.close()
            conn = await asyncpg.connect(base + f"/{PG_DB}")
            try:
                await conn.execute(
                    f"GRANT CONNECT ON DATABASE {PG_DB} TO {PG_RO_ROLE};"
                    f"GRANT USAGE ON SCHEMA public TO {PG_RO_ROLE};"
                    f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {PG_RO_ROLE};"
                    f"ALTER DEFAULT PRIVILEGES FOR ROLE {PG_ROLE} IN SCHEMA public "
                    f"GRANT SELECT ON TABLES TO {PG_RO_ROLE};"
                )
            finally:
                await conn.close()

        asyncio.run(run())


async def _pg_query(url: str, sql: str) -> object:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=2)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


class KafkaPart(Part):
    def __init__(self, cfg: StackConfig) -> None:
        super().__init__("kafka", cfg, port=cfg.kafka_port, marker="kafka.Kafka")

    @property
    def libs(self) -> Path:
        return self.cfg.cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"

    @property
    def data(self) -> Path:
        return self.cfg.home / "kafka"

    @property
    def properties(self) -> Path:
        return self.cfg.home / "kafka-server.properties"

    def _java(self) -> str:
        java = shutil.which("java")
        if not java:
            raise StackError(
                "`java` not found: install a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"
            )
        return java

    def fetch_jars(self) -> None:
        done = self.libs.parent / ".complete"
        if done.exists():
            return
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError(
                "`mvn` not found: install Maven (apt-get install maven) so the Kafka jars can be resolved"
            )
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        log = self.cfg.logs / "kafka-mvn.log"
        tmp = self.libs.parent / "libs.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with open(log, "wb") as out:
            res = subprocess.run(
                [
                    mvn,
                    "-B",
                    "-q",
                    "-f",
                    str(STACK_FILES / "kafka-pom.xml"),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={tmp}",
                    "-DincludeScope=runtime",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if res.returncode != 0:
            raise StackError(
                f"resolving the Kafka {KAFKA_VERSION} jars with Maven failed; see {log}"
            )
        shutil.rmtree(self.libs, ignore_errors=True)
        tmp.rename(self.libs)
        done.write_text(KAFKA_VERSION + "\n")

    def _classpath(self) -> str:
        return f"{self.libs}/*"

    def prepare(self) -> None:
        self._java()
        self.fetch_jars()
        self.cfg.home.mkdir(parents=True, exist_ok=True)
        self.properties.write_text(
            "process.roles=broker,controller\n"
            "node.id=1\n"
            f"controller.quorum.bootstrap.servers=127.0.0.1:{self.cfg.controller_port}\n"
            f"listeners=PLAINTEXT://127.0.0.1:{self.cfg.kafka_port},CONTROLLER://127.0.0.1:{self.cfg.controller_port}\n"
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.cfg.kafka_port},CONTROLLER://127.0.0.1:{self.cfg.controller_port}\n"
            "controller.listener.names=CONTROLLER\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n"
            f"log.dirs={self.data}\n"
            "num.partitions=3\n"
            "auto.create.topics.enable=false\n"
            "offsets.topic.replication.factor=1\n"
            "offsets.topic.num.partitions=10\n"
            "transaction.state.log.replication.factor=1\n"
            "transaction.state.log.min.isr=1\n"
            "share.coordinator.state.topic.replication.factor=1\n"
            "share.coordinator.state.topic.min.isr=1\n"
            "group.initial.rebalance.delay.ms=0\n"
            "log.retention.hours=24\n"
            "message.max.bytes=10485760\n"
        )
        marker = _marker(self.data)
        if (self.data / "meta.properties").exists() and not marker.exists():
            return
        if self.data.exists() and any(self.data.iterdir()) and not marker.exists():
            raise StackError(
                f"{self.data} exists but is not a Kafka log folder hoptrace formatted; "
                f"move it away yourself (hoptrace will not delete it), then run `hoptrace dev up`"
            )
        marker.write_text("format in progress\n")
        if self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True)
        log = self.cfg.logs / "kafka-format.log"
        with open(log, "wb") as out:
            res = subprocess.run(
                [
                    self._java(),
                    "-cp",
                    self._classpath(),
                    f"-Dhoptrace.kafka.log={log}",
                    f"-Dlog4j2.configurationFile={STACK_FILES / 'log4j2.properties'}",
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    f"--cluster-id={_kafka_cluster_id()}",
                    "-c",
                    str(self.properties),
                    "--ignore-formatted",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if res.returncode != 0:
            raise StackError(f"formatting Kafka storage failed; see {log} ({_tail(log, 2)})")
        marker.unlink()

    def command(self) -> list[str]:
        return [
            self._java(),
            "-Xms256m",
            "-Xmx1g",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dhoptrace.kafka.log={self.log_file}",
            f"-Dlog4j2.configurationFile={STACK_FILES / 'log4j2.properties'}",
            "-cp",
            self._classpath(),
            "kafka.Kafka",
            str(self.properties),
        ]

    def ready(self) -> bool:
        if not _port_open(self.cfg.kafka_port):
            return False
        try:
            return asyncio.run(_kafka_metadata(self.cfg.kafka_bootstrap))
        except Exception:
            return False


def _kafka_cluster_id() -> str:
    """A random cluster id as Kafka writes them (URL-safe base64 of 16 bytes), never starting
    with "-" (Kafka's Uuid.randomUuid rules those out too: a command line reads them as options)."""
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


async def _kafka_metadata(bootstrap: str) -> bool:
    """A real metadata request: the broker answers with itself as a live broker."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(admin.start(), 5)
        await asyncio.wait_for(admin.list_topics(), 5)
        return True
    finally:
        await admin.close()


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
            # a private stack (other HOPTRACE_HOME / ports) points its services at itself
            "HOPTRACE_DATABASE_URL": os.environ.get("HOPTRACE_DATABASE_URL", self.cfg.database_url),
            "HOPTRACE_KAFKA_BOOTSTRAP": os.environ.get(
                "HOPTRACE_KAFKA_BOOTSTRAP", self.cfg.kafka_bootstrap
            ),
            "HOPTRACE_READY_FILE": str(self.ready_file),
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


# --------------------------------------------------------------------------------------------
# the stack


#: hoptrace's own processes, in start order: (name, CLI arguments, module that must exist).
SERVICES: list[tuple[str, list[str], str]] = [
    ("collector", ["collector"], "hoptrace.collector.service"),
    ("admin-service", ["worker", "admin-service"], "hoptrace.workers.run"),
    ("payment-service", ["worker", "payment-service"], "hoptrace.workers.run"),
    ("purchase-worker", ["worker", "purchase-worker"], "hoptrace.workers.run"),
    ("allocation-worker", ["worker", "allocation-worker"], "hoptrace.workers.run"),
    ("session-worker", ["worker", "session-worker"], "hoptrace.workers.run"),
    ("dashboard", ["dashboard"], "hoptrace.dashboard.serve"),
]


def _available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def infra_parts(cfg: StackConfig) -> list[Part]:
    return [PostgresPart(cfg), KafkaPart(cfg)]


def _service_port(name: str) -> int | None:
    """The port a service listens on (from the settings, so ``HOPTRACE_*_PORT`` moves it)."""
    from hoptrace.settings import Settings

    s = Settings()
    return {
        "collector": s.otlp_http_port,
        "admin-service": s.admin_service_port,
        "payment-service": s.payment_service_port,
        "dashboard": s.dashboard_port,
    }.get(name)


def service_parts(cfg: StackConfig) -> list[ServicePart]:
    return [
        ServicePart(name, cfg, args, port=_service_port(name))
        for name, args, module in SERVICES
        if _available(module)
    ]


def all_parts(cfg: StackConfig) -> list[Part]:
    return [*infra_parts(cfg), *service_parts(cfg)]


def part(cfg: StackConfig, name: str) -> Part:
    for p in all_parts(cfg):
        if p.name == name:
            return p
    known = ", ".join(p.name for p in all_parts(cfg))
    raise StackError(f"unknown part {name!r}; known parts: {known}")


#: One-shot steps run after the infrastructure is up and before the services start.
INIT_STEPS: list[tuple[str, list[str], str]] = [
    ("migrate", ["migrate"], "hoptrace.workers.schema"),
    ("topics", ["topics", "ensure"], "hoptrace.workers.topics"),
]


def run_init(cfg: StackConfig, echo: Callable[[str], None] = print) -> None:
    """Migrations and topics, as `hoptrace migrate` / `hoptrace topics ensure` (idempotent)."""
    env = {
        **os.environ,
        "HOPTRACE_DATABASE_URL": os.environ.get("HOPTRACE_DATABASE_URL", cfg.database_url),
        "HOPTRACE_KAFKA_BOOTSTRAP": os.environ.get("HOPTRACE_KAFKA_BOOTSTRAP", cfg.kafka_bootstrap),
    }
    cfg.logs.mkdir(parents=True, exist_ok=True)
    for name, args, module in INIT_STEPS:
        if not _available(module):
            continue
        log = cfg.logs / f"init-{name}.log"
        with open(log, "wb") as out:
            res = subprocess.run(
                [sys.executable, "-m", "hoptrace.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(PROJECT_ROOT),
            )
        if res.returncode != 0:
            raise StackError(f"`hoptrace {' '.join(args)}` failed; see {log} ({_tail(log, 2)})")
        echo(f"{name:<18} done        log {log}")


def up(cfg: StackConfig, *, services: bool = True, echo: Callable[[str], None] = print) -> float:
    """Start every part that is not running (idempotent). Returns seconds taken."""
    t0 = time.monotonic()
    parts = all_parts(cfg) if services else infra_parts(cfg)
    for p in parts:
        t = time.monotonic()
        started = p.start()
        pid = p.pid()
        verb = "started" if started else "already up"
        echo(
            f"{p.name:<18} {verb:<10} pid {pid}  port {p.port or '-'}  ({time.monotonic() - t:.1f}s)  log {p.log_file}"
        )
        if services and p.name == "kafka":
            run_init(cfg, echo)  # migrations and topics before any service starts
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
