"""Helpers shared by the tests: isolated databases, topics and pipeline specs on the real stack."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from hoptrace.settings import PROJECT_ROOT

REFERENCE_SPEC = PROJECT_ROOT / "pipelines" / "payments.toml"


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def create_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        gone = [n for n in names if n in existing]
        if gone:
            await admin.delete_topics(gone)
    finally:
        await admin.close()


def isolated_spec(tmp_dir: Path, suffix: str, source: Path = REFERENCE_SPEC) -> Path:
    """A copy of a pipeline spec whose topics and consumer groups carry ``suffix``, so one test's
    records and offsets never meet another's. Step ids and services keep their names."""
    text = source.read_text()

    def rename(match: re.Match[str]) -> str:
        return f'{match.group(1)} = "{match.group(2)}-{suffix}"'

    text = re.sub(r'^(consumes|emits|group)\s*=\s*"([^"]+)"', rename, text, flags=re.M)
    out = tmp_dir / f"pipeline-{suffix}.toml"
    out.write_text(text)
    return out


async def wait_for(
    check: Callable[[], Awaitable[object]],
    timeout: float = 20.0,
    interval: float = 0.1,
    what: str = "condition",
) -> object:
    """Await a condition with a timeout (never a bare sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


def free_port() -> int:
    """A port nothing listens on right now (tests never use the fixed defaults)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readonly_url(db_url: str) -> str:
    """The local stack's read-only role (``hoptrace_ro``) on the database ``db_url`` names: what
    ``HOPTRACE_DASHBOARD_DATABASE_URL`` is set to in tests (nothing derives it in the product)."""
    scheme, _, rest = db_url.partition("://")
    return f"{scheme}://hoptrace_ro:hoptrace_ro@{rest.split('@', 1)[1]}"
