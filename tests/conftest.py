"""Session fixtures: the real local stack (PostgreSQL + Kafka) is brought up once, or reused when
already up; every test gets its own database and its own topic suffix."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoptrace import devstack

from .support import create_database, drop_database, isolated_spec, readonly_url, unique


@pytest.fixture(scope="session")
def stack() -> devstack.StackConfig:
    """The running local stack; started here if it is not up. Never stopped here: other test
    sessions may share it (`hoptrace dev down` stops it)."""
    cfg = devstack.StackConfig.from_env()
    cfg.home.mkdir(parents=True, exist_ok=True)
    with open(cfg.home / "stack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent pytest runs: one starts, the others wait
        try:
            devstack.up(cfg, services=False, echo=lambda _line: None)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return cfg


@pytest.fixture(scope="session")
def admin_db_url(stack: devstack.StackConfig) -> str:
    return stack.database_url


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: devstack.StackConfig) -> str:
    return stack.kafka_bootstrap


@pytest.fixture
def db_url(admin_db_url: str) -> Iterator[str]:
    """A fresh, empty database for this test only (dropped afterwards)."""
    name = unique("hoptrace_t_")
    url = asyncio.run(create_database(admin_db_url, name))
    yield url
    asyncio.run(drop_database(admin_db_url, name))


@pytest.fixture
def suffix() -> str:
    """A unique suffix for this test's topic and group names."""
    return unique("")


@pytest.fixture
def spec_path(tmp_path: Path, suffix: str) -> Path:
    """The reference pipeline spec with this test's own topics and groups."""
    return isolated_spec(tmp_path, suffix)


@pytest.fixture
def hoptrace_env(
    db_url: str, kafka_bootstrap: str, spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Environment pointing hoptrace at this test's database, topics and spec (the dashboard at
    it through the read-only role)."""
    env = {
        "HOPTRACE_DATABASE_URL": db_url,
        "HOPTRACE_DASHBOARD_DATABASE_URL": readonly_url(db_url),
        "HOPTRACE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HOPTRACE_PIPELINE": str(spec_path),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from hoptrace.settings import get_settings

    get_settings.cache_clear()
    yield {**os.environ, **env}
    get_settings.cache_clear()
