"""Collector fixtures: an in-process collector on free ports against the per-test database."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hoptrace.collector.service import Collector
from hoptrace.settings import Settings

from ..support import free_port

MakeCollector = Callable[..., Any]


@pytest.fixture
def collector_settings(db_url: str, spec_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "database_url": db_url,
            "pipeline": spec_path,
            "otlp_grpc_port": free_port(),
            "otlp_http_port": free_port(),
            "stall_scan_interval": 0.2,
            "ingest_token": None,
            "alert_webhook_url": None,
            "alertmanager_url": None,
            "span_topic": None,
        }
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
async def make_collector(
    collector_settings: Callable[..., Settings],
) -> AsyncIterator[MakeCollector]:
    started: list[Collector] = []

    async def make(**overrides: Any) -> Collector:
        cause_for = overrides.pop("cause_for", None)
        c = Collector(collector_settings(**overrides), cause_for=cause_for)
        await c.start()
        started.append(c)
        return c

    yield make
    for c in reversed(started):
        await c.stop()


@pytest.fixture
async def collector(make_collector: MakeCollector) -> Collector:
    return await make_collector()


@pytest.fixture
async def pool(db_url: str, collector: Collector) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=3)
    yield p
    await p.close()


@pytest.fixture
def fast_spec(spec_path: Path) -> Path:
    """The reference pipeline with 300ms deadlines."""
    out = spec_path.with_name("fast-" + spec_path.name)
    out.write_text(re.sub(r'deadline = "[^"]+"', 'deadline = "300ms"', spec_path.read_text()))
    return out
