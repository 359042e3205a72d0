"""Fixtures of the interop tests: an OTLP receiver, this test's topics and the reference
pipeline's tables in this test's database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from hoptrace.workers.schema import migrate

from ..support import create_topics, delete_topics
from .spans import SpanSink


@pytest.fixture
def sink(request: pytest.FixtureRequest) -> Iterator[SpanSink]:
    """The test's OTLP receiver: gRPC for the Node.js worker (see SpanSink), the Java agent's
    default HTTP/protobuf for the Java consumer."""
    protocol = "grpc" if request.node.name.startswith("test_node_") else "http/protobuf"
    with SpanSink(protocol) as s:
        yield s


@pytest.fixture
async def topics(kafka_bootstrap: str, suffix: str) -> AsyncIterator[tuple[str, str]]:
    names = (f"interop-in-{suffix}", f"interop-out-{suffix}")
    await create_topics(kafka_bootstrap, list(names))
    yield names
    await delete_topics(kafka_bootstrap, list(names))


@pytest.fixture
async def schema(db_url: str) -> str:
    """The reference pipeline's tables (the services add their own processed-mark tables)."""
    await migrate(db_url)
    return db_url
