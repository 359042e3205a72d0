"""The OTel Collector's OTLP receivers authenticate (bearertokenauth), run for real: the
repository's collector/otelcol-config.yaml on a real collector build (tools/otelcol), in front
of a real `hoptrace collector` that only accepts the OTel Collector's ingest token.

Before: the receivers took spans from anyone and forwarded them WITH the ingest token, so a
forged step span (``session.created`` with outcome ``ok``) completed a stalled payment and
resolved its alert. Now a span without the receivers' token (or with a wrong one) is refused on
both protocols and never reaches hoptrace; one with the token is forwarded and stored."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest

from benchmarks.otlp_fuzz import EXPORT, CollectorProc
from tests.collector.helpers import request, step_span
from tests.support import free_port, wait_for

from .gotools import OTELCOL_CONFIG, clean_env, go_tool, timeout_for

pytestmark = timeout_for("otelcol", 180)

INGEST_TOKEN = f"ingest-{uuid.uuid4().hex}"
OTLP_TOKEN = f"otlp-{uuid.uuid4().hex}"
PB = {"content-type": "application/x-protobuf"}


@dataclass
class Front:
    """The OTel Collector (its OTLP ports) in front of a hoptrace collector."""

    grpc_target: str
    http: str
    collector: CollectorProc
    log: Path


@pytest.fixture
def front(db_url: str, spec_path: Path, tmp_path: Path) -> Iterator[Front]:
    collector = CollectorProc(db_url, spec_path, tmp_path, token=INGEST_TOKEN)
    collector.start()
    grpc_port, http_port, health = free_port(), free_port(), free_port()
    env = clean_env(
        {
            "OTELCOL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}",
            "OTELCOL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{http_port}",
            "OTELCOL_HEALTH_ENDPOINT": f"127.0.0.1:{health}",
            "OTELCOL_METRICS_HOST": "127.0.0.1",
            "OTELCOL_METRICS_PORT": str(free_port()),
            "JAEGER_OTLP_ENDPOINT": f"127.0.0.1:{free_port()}",  # nothing listens: not needed
            "HOPTRACE_OTLP_ENDPOINT": collector.grpc_target,
            "HOPTRACE_INGEST_TOKEN": INGEST_TOKEN,
            "HOPTRACE_OTLP_TOKEN": OTLP_TOKEN,
        }
    )
    log = tmp_path / "otelcol.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(go_tool("otelcol")), f"--config={OTELCOL_CONFIG}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    async def healthy() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                return (
                    await client.get(f"http://127.0.0.1:{health}/", timeout=2)
                ).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        asyncio.run(wait_for(healthy, timeout=30, what="the OTel Collector"))
        yield Front(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", collector, log)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        collector.stop()


async def stored(db_url: str, cid: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM spans WHERE correlation_id = $1", cid)
    finally:
        await conn.close()


async def state(db_url: str, cid: str) -> str | None:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval("SELECT state FROM correlations WHERE correlation_id = $1", cid)
    finally:
        await conn.close()


async def test_a_forged_span_without_the_token_never_reaches_hoptrace(front: Front) -> None:
    cid = f"stalled-{uuid.uuid4().hex[:12]}"
    db = front.collector.db_url
    # the payment's first two steps, sent as a service sends them (with the receivers' token)
    real = request([step_span(cid, 0), step_span(cid, 1)]).SerializeToString()
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        r = await client.post(
            f"{front.http}/v1/traces",
            content=real,
            headers={**PB, "authorization": f"Bearer {OTLP_TOKEN}"},
        )
        assert r.status_code == 200, r.text
    await wait_for(lambda: stored(db, cid), timeout=30, what="the authorized spans")
    assert await state(db, cid) != "completed"

    # a forged last step (session.created, outcome ok) and the one before it
    forged = request([step_span(cid, 2), step_span(cid, 3)]).SerializeToString()
    wrong = [
        None,
        "Bearer",
        "Bearer nope",
        f"Bearer {INGEST_TOKEN}",
        OTLP_TOKEN,
        f"Basic {OTLP_TOKEN}",
    ]
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        for auth in wrong:
            headers = PB if auth is None else {**PB, "authorization": auth}
            r = await client.post(f"{front.http}/v1/traces", content=forged, headers=headers)
            assert r.status_code == 401, (auth, r.status_code, r.text)
    async with grpc.aio.insecure_channel(front.grpc_target) as channel:
        call = channel.unary_unary(EXPORT)
        for auth in wrong:
            md = None if auth is None else (("authorization", auth),)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(forged, metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (auth, err.value)

    # a later authorized span of another payment arrives: the forged ones never will
    canary = f"canary-{uuid.uuid4().hex[:12]}"
    async with grpc.aio.insecure_channel(front.grpc_target) as channel:
        await channel.unary_unary(EXPORT)(
            request([step_span(canary, 0)]).SerializeToString(),
            metadata=(("authorization", f"Bearer {OTLP_TOKEN}"),),
            timeout=10,
        )
    await wait_for(lambda: stored(db, canary), timeout=30, what="the canary, sent after")
    assert await stored(db, cid) == 2  # only the two real spans
    assert await state(db, cid) != "completed"


def test_the_receivers_refuse_to_start_without_a_token(tmp_path: Path) -> None:
    """No token configured is no open door: the collector does not start."""
    proc = subprocess.run(
        [str(go_tool("otelcol")), "validate", f"--config={OTELCOL_CONFIG}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env({"HOPTRACE_INGEST_TOKEN": INGEST_TOKEN}),
        check=False,
    )
    assert proc.returncode != 0
    assert "bearertokenauth" in proc.stderr and "token" in proc.stderr, proc.stderr
