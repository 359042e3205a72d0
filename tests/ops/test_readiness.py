"""`/readyz` of the real collector (`hoptrace collector`, a subprocess, as compose runs it) also
follows the span writes: a store that answers ``SELECT 1`` but refuses the writes (here: a
trigger on ``spans`` that raises, as a full disk or a broken partition would) is not ready, with
the reason, while ``/healthz`` stays 200; once the writes land again it is ready, and the held
batch is stored."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from ..collector.helpers import request, step_span
from ..support import free_port

pytestmark = pytest.mark.stack


@pytest.fixture
def collector(db_url: str, spec_path: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    ready = tmp_path / "collector.ready"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HOPTRACE_", "OTEL_"))},
        "HOPTRACE_DATABASE_URL": db_url,
        "HOPTRACE_PIPELINE": str(spec_path),
        "HOPTRACE_OTLP_GRPC_PORT": str(free_port()),
        "HOPTRACE_OTLP_HTTP_PORT": str(port),
        "HOPTRACE_READY_FILE": str(ready),
    }
    log = tmp_path / "collector.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hoptrace.cli", "collector"], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def _wait(url: str, status: int, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.get(url, timeout=5, trust_env=False)
        if resp.status_code == status or time.monotonic() > deadline:
            return resp
        time.sleep(0.1)


REFUSE = """
CREATE FUNCTION refuse_spans() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN RAISE EXCEPTION 'span writes refused by the test'; END$$;
CREATE TRIGGER refuse_spans BEFORE INSERT ON spans FOR EACH ROW EXECUTE FUNCTION refuse_spans();
"""
ALLOW = "DROP TRIGGER refuse_spans ON spans; DROP FUNCTION refuse_spans();"


def _sql(db_url: str, statement: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(db_url)
        try:
            if ";" in statement:
                return await conn.execute(statement)
            return await conn.fetchval(statement)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_readyz_is_503_while_span_writes_fail_and_200_once_they_land(
    collector: str, db_url: str
) -> None:
    assert _wait(f"{collector}/readyz", 200).status_code == 200
    _sql(db_url, REFUSE)
    try:
        body = request([step_span("ready-1", 0)]).SerializeToString()
        sent = httpx.post(
            f"{collector}/v1/traces",
            content=body,
            headers={"content-type": "application/x-protobuf"},
            trust_env=False,
        )
        assert sent.status_code == 200  # accepted into the queue; the write fails behind it
        not_ready = _wait(f"{collector}/readyz", 503)
        assert not_ready.status_code == 503
        assert "the last span write failed" in not_ready.text
        assert "span writes refused by the test" in not_ready.text, not_ready.text
        assert httpx.get(f"{collector}/healthz", trust_env=False).status_code == 200
    finally:
        _sql(db_url, ALLOW)
    assert _wait(f"{collector}/readyz", 200).status_code == 200
    stored = _sql(db_url, "SELECT count(*) FROM spans WHERE correlation_id = 'ready-1'")
    assert stored == 1
