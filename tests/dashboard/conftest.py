"""Fixtures: a per-test store filled through the collector's write path, readable by hoptrace_ro."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoptrace.contract import load_spec
from hoptrace.dashboard.api_source import ApiSource

from ..support import create_topics, delete_topics
from .seed import Seeded, seed


@pytest.fixture
def topics(kafka_bootstrap: str, spec_path: Path) -> Iterator[list[str]]:
    """This test's pipeline topics (as `hoptrace topics ensure` makes them); no worker runs."""
    names = sorted(load_spec(spec_path).topics)
    asyncio.run(create_topics(kafka_bootstrap, names))
    yield names
    asyncio.run(delete_topics(kafka_bootstrap, names))


@pytest.fixture
def seeded(
    hoptrace_env: dict[str, str], db_url: str, spec_path: Path, topics: list[str]
) -> Iterator[Seeded]:
    """Completed, stalled, failed and in-progress payments in this test's database."""
    yield asyncio.run(seed(db_url, load_spec(spec_path)))
    ApiSource.close_all()
