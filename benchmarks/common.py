"""What the benchmarks share: a database of their own on the local stack, a copy of a pipeline
spec with their own topics and groups, a free port. Benchmarks import the product (``hoptrace``)
and this module, never the tests."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import asyncpg

from hoptrace.settings import PROJECT_ROOT

REFERENCE_SPEC = PROJECT_ROOT / "pipelines" / "payments.toml"


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:  # type: ignore[type-arg]
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``admin_url``."""
    return admin_url.rpartition("/")[0] + "/" + name


async def create_database(admin_url: str, name: str | None = None, *, reuse: bool = False) -> str:
    """A new database (``hoptrace_bench_<random>`` unless named) on the server of ``admin_url``;
    its URL. ``reuse``: an existing one of that name is kept."""
    name = name or f"hoptrace_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not (reuse and exists):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(admin_url, name)


async def drop_database(admin_url: str, db_url: str) -> None:
    name = db_url.rpartition("/")[2]
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def isolated_spec(
    folder: Path,
    suffix: str,
    *,
    partitions: int | None = None,
    source: Path = REFERENCE_SPEC,
) -> Path:
    """A copy of a pipeline spec whose topics and consumer groups carry ``suffix`` (one run's
    records and offsets never meet another's; step ids and services keep their names), written
    into ``folder``; ``partitions`` overrides the spec's."""
    text = source.read_text()
    if partitions:
        text = re.sub(r"^partitions\s*=.*\n", "", text, flags=re.M)
        text = text.replace("[pipeline]\n", f"[pipeline]\npartitions = {partitions}\n", 1)
    text = re.sub(
        r'^(consumes|emits|group)\s*=\s*"([^"]+)"',
        lambda m: f'{m.group(1)} = "{m.group(2)}-{suffix}"',
        text,
        flags=re.M,
    )
    out = folder / f"pipeline-{suffix}.toml"
    out.write_text(text)
    return out
