"""The local stack's PostgreSQL: a private cluster (``initdb`` into ``<home>/pg``, run by a
non-root system user when we are root), listening on 127.0.0.1 only, with the ``hoptrace``
database, its owner role and the read-only ``hoptrace_ro`` role the dashboard uses.

Roles: initdb creates the superuser ``postgres`` with a password drawn then (kept in
``<home>/pg-superuser.password``, 0600); it provisions the rest and nothing else logs in with
it. The owner ``hoptrace`` is no superuser: it may create databases and roles (the test suite
creates both) and signal other roles' backends (``pg_signal_backend``: ``DROP DATABASE ...
WITH (FORCE)`` of a test database the read-only role is connected to). Every login needs a
password, on the local socket as on TCP (scram-sha-256). A cluster made before this (its
superuser is ``hoptrace``, no password file) keeps working as it is."""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .devstack_config import (
    PG_DB,
    PG_PASSWORD,
    PG_RO_PASSWORD,
    PG_RO_ROLE,
    PG_ROLE,
    PG_SUPERUSER,
    StackConfig,
    StackError,
    initialising_marker,
)
from .devstack_process import Part, pid_alive, port_open, tail

PG_SYSTEM_USER = "hoptrace"


def pg_bin() -> Path:
    """The folder of the PostgreSQL server binaries (the newest Debian version, else PATH)."""
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


class PostgresServer(Part):
    def __init__(self, name: str, cfg: StackConfig) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown (SIGTERM waits for every client to leave).
        super().__init__(name, cfg, port=cfg.pg_port, marker="postgres", stop_signal=signal.SIGINT)

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
        bin_dir = pg_bin()
        self._ensure_user()
        self.cfg.home.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(parents=True, exist_ok=True)
        self._chown(self.sockets)
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        marker = initialising_marker(self.data)
        if (self.data / "PG_VERSION").exists() and not marker.exists():
            self._chown(self.data)
            self._remove_stale_pid_file()
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
        self._initdb(bin_dir)
        self._configure()
        marker.unlink()

    def _remove_stale_pid_file(self) -> None:
        """A killed server leaves ``postmaster.pid``; pg_ctl would refuse to start otherwise."""
        stale = self.data / "postmaster.pid"
        if not stale.exists():
            return
        try:
            old = int(stale.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            old = -1
        if old <= 0 or not pid_alive(old):
            stale.unlink()

    def _initdb(self, bin_dir: Path) -> None:
        password = secrets.token_urlsafe(24)
        pwfile = self.cfg.home / "pg-pw"
        pwfile.touch(mode=0o600)
        pwfile.write_text(password + "\n")
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
                        PG_SUPERUSER,
                        f"--pwfile={pwfile}",
                        "--auth-local=scram-sha-256",
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
            raise StackError(f"initdb failed; see {log} ({tail(log, 2)})")
        keep = self.cfg.superuser_password_file
        keep.unlink(missing_ok=True)
        keep.touch(mode=0o600)
        keep.write_text(password + "\n")

    def _configure(self) -> None:
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                "\n# hoptrace local stack\n"
                f"listen_addresses = '127.0.0.1'\nport = {self.cfg.pg_port}\n"
                f"unix_socket_directories = '{self.sockets}'\n"
                "max_connections = 300\nshared_buffers = 512MB\n"
                # checkpoints by time, not every ~1 GB of WAL: fewer full-page images (16% less
                # WAL per span under span ingest, docs/scaling.md)
                "synchronous_commit = off\nmax_wal_size = 8GB\n"
                "log_min_duration_statement = 2000\n"
            )

    def command(self) -> list[str]:
        return [str(pg_bin() / "postgres"), "-D", str(self.data)]

    def superuser_url(self, database: str = "postgres") -> str:
        """The superuser's URL (a cluster made before the superuser had a password file: the
        owner role, its superuser then)."""
        keep = self.cfg.superuser_password_file
        user, password = PG_ROLE, PG_PASSWORD
        if keep.exists():
            user, password = PG_SUPERUSER, keep.read_text().strip()
        return f"postgresql://{user}:{password}@127.0.0.1:{self.cfg.pg_port}/{database}"

    def ready(self) -> bool:
        if not port_open(self.cfg.pg_port):
            return False
        try:
            return asyncio.run(_pg_query(self.superuser_url(), "SELECT 1")) == 1
        except Exception:
            return False

    def start(self, extra_env: dict[str, str] | None = None) -> bool:
        started = super().start(extra_env)
        asyncio.run(_ensure_roles(self.superuser_url(), self.superuser_url(PG_DB)))
        return started


async def _ensure_roles(admin_url: str, admin_db_url: str) -> None:
    """The owner role (no superuser), the database, the read-only role and its grants
    (idempotent), as the superuser (``admin_url``: its ``postgres`` database, ``admin_db_url``:
    the hoptrace database)."""
    import asyncpg

    sql = f"""
    DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{PG_ROLE}') THEN
        CREATE ROLE {PG_ROLE} LOGIN PASSWORD '{PG_PASSWORD}' NOSUPERUSER CREATEDB CREATEROLE;
      END IF;
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{PG_RO_ROLE}') THEN
        CREATE ROLE {PG_RO_ROLE} LOGIN PASSWORD '{PG_RO_PASSWORD}';
      END IF;
    END $$;
    ALTER ROLE {PG_RO_ROLE} SET default_transaction_read_only = on;
    """  # noqa: S608 -- constants only
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
        if await conn.fetchval("SELECT current_user") != PG_ROLE:  # not an older cluster's
            await conn.execute(f"GRANT pg_signal_backend TO {PG_ROLE}")
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PG_DB)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{PG_DB}" OWNER {PG_ROLE}')
    finally:
        await conn.close()
    conn = await asyncpg.connect(admin_db_url)
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


async def _pg_query(url: str, sql: str) -> object:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=2)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()
