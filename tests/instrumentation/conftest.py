"""Fixtures for the instrumentation tests: this test's spec and topics on the real Kafka, tables
in this test's database, and tracing into an in-memory exporter (swapped per test)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hoptrace.contract import PipelineSpec, load_spec
from hoptrace.instrumentation.tracing import configure_tracing, shutdown_tracing

from ..support import create_topics, delete_topics
from .helpers import create_tables


@pytest.fixture
def spec(spec_path: Path) -> PipelineSpec:
    return load_spec(spec_path)


@pytest.fixture
def topics(spec: PipelineSpec, kafka_bootstrap: str) -> Iterator[list[str]]:
    names = spec.topics
    asyncio.run(create_topics(kafka_bootstrap, names, partitions=spec.partitions))
    yield names
    asyncio.run(delete_topics(kafka_bootstrap, names))


@pytest.fixture
def tables(db_url: str) -> str:
    asyncio.run(create_tables(db_url))
    return db_url


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span ended during the test, exported synchronously into memory."""
    exporter = InMemorySpanExporter()
    configure_tracing("hoptrace-tests", exporter=exporter, simple=True)
    yield exporter
    shutdown_tracing(timeout_s=2.0)
