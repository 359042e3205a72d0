"""Fixtures: a per-test store filled through the collector's write path, readable by hoptrace_ro."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hoptrace.instrumentation.spec import load_spec

from .seed import Seeded, seed


@pytest.fixture
def seeded(hoptrace_env: dict[str, str], db_url: str, spec_path: Path) -> Seeded:
    """Completed, stalled, failed and in-progress payments in this test's database."""
    return asyncio.run(seed(db_url, load_spec(spec_path)))
