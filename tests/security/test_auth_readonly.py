"""The ingest token is enforced on both receivers (HTTP 401, gRPC UNAUTHENTICATED, nothing
stored) and the dashboard's database role cannot write."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest

from benchmarks.otlp_fuzz import EXPORT, CollectorProc, canary_stored, valid_request
from hoptrace.settings import get_settings
from tests.support import wait_for

TOKEN = f"tok-{uuid.uuid4().hex}"


@pytest.fixture
def collector(db_url: str, spec_path: Path, tmp_path: Path) -> CollectorProc:
    col = CollectorProc(db_url, spec_path, tmp_path, token=TOKEN)
    col.start()
    yield col
    col.stop()


async def spans_stored(db_url: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM spans")
    finally:
        await conn.close()


async def test_ingest_token_is_enforced_on_http_and_grpc(collector: CollectorProc) -> None:
    body = valid_request(random.Random(5))
    pb = {"content-type": "application/x-protobuf"}
    wrong = [None, "Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN, "Bearer"]
    async with httpx.AsyncClient(timeout=10) as client:
        for auth in wrong:
            headers = pb if auth is None else {**pb, "authorization": auth}
            r = await client.post(f"{collector.http}/v1/traces", content=body, headers=headers)
            assert r.status_code == 401, (auth, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
    async with grpc.aio.insecure_channel(collector.grpc_target) as channel:
        call = channel.unary_unary(EXPORT)
        for auth in wrong:
            md = None if auth is None else (("authorization", auth),)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(body, metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, auth
    assert await spans_stored(collector.db_url) == 0  # nothing stored
    # positive control: the right token is accepted on both transports
    async with grpc.aio.insecure_channel(collector.grpc_target) as channel:
        call = channel.unary_unary(EXPORT)
        await call(body, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(
            f"{collector.http}/v1/traces",
            content=valid_request(random.Random(6)),
            headers={**pb, "authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 200
    assert not await canary_stored(collector, "no-token-canary", timeout=0.5)

    async def four() -> bool:
        return await spans_stored(collector.db_url) == 4

    await wait_for(four, timeout=20, what="the 4 spans sent with the token")


async def _ro_cannot_write(admin_url: str, ro_url: str) -> None:
    conn = await asyncpg.connect(ro_url)
    try:
        assert await conn.fetchval("SELECT current_user") == "hoptrace_ro"
        assert await conn.fetchval("SELECT count(*) FROM spans") >= 0  # it can read
        writes = [
            "INSERT INTO spans (trace_id, span_id, name, service, start_time, end_time, "
            "duration_us) VALUES ('t', 's', 'n', 'svc', now(), now(), 0)",
            "UPDATE correlations SET state = 'completed'",
            "DELETE FROM alerts",
            "TRUNCATE spans",
            "DROP TABLE spans",
            "CREATE TABLE ro_was_here (x int)",
            "ALTER TABLE spans ADD COLUMN pwned int",
        ]
        # two layers: the role's sessions are read-only, and it has no write privilege at all
        for sql in writes:
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute(sql)
        await conn.execute("SET default_transaction_read_only = off")  # a client can do this
        for sql in writes:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
        rolsuper = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert rolsuper is False
    finally:
        await conn.close()


async def test_dashboard_role_is_read_only(
    db_url: str, collector: CollectorProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write through ``get_settings().readonly_database_url()`` fails (the per-test store,
    granted to the read-only role as the deployment grants it)."""
    name = db_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(f'GRANT CONNECT ON DATABASE "{name}" TO hoptrace_ro')
        await conn.execute("GRANT USAGE ON SCHEMA public TO hoptrace_ro")
        await conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO hoptrace_ro")
    finally:
        await conn.close()
    monkeypatch.setenv("HOPTRACE_DATABASE_URL", db_url)
    # as the deployment sets it (the URL is never derived from the owner's: see below)
    base, _, rest = db_url.partition("://")
    given = f"{base}://hoptrace_ro:hoptrace_ro@{rest.split('@', 1)[1]}"
    monkeypatch.setenv("HOPTRACE_DASHBOARD_DATABASE_URL", given)
    get_settings.cache_clear()
    try:
        ro_url = get_settings().readonly_database_url()
    finally:
        get_settings.cache_clear()
    assert "hoptrace_ro" in ro_url and ro_url != db_url
    await _ro_cannot_write(db_url, ro_url)


def test_the_dashboard_refuses_to_start_without_its_read_only_url(tmp_path: Path) -> None:
    """Fix: with an owner password other than ``hoptrace`` the read-only URL (derived by
    replacing ``hoptrace:hoptrace@``) stayed the owner's: the dashboard started and read as the
    owner, a superuser. Now it refuses to start, with one line saying what to set."""
    import os
    import subprocess

    from tests.support import free_port
    from tests.workers.harness import HOPTRACE

    env = {k: v for k, v in os.environ.items() if not k.startswith("HOPTRACE_")}
    env["HOPTRACE_DATABASE_URL"] = "postgresql://hoptrace:Not-The-Default@127.0.0.1:55432/hoptrace"
    env["HOPTRACE_READY_FILE"] = str(tmp_path / "ready")
    proc = subprocess.Popen(
        [HOPTRACE, "dashboard", "--port", str(free_port())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
        raise AssertionError(f"the dashboard started as the owner role: {err[-2000:]}") from None
    assert proc.returncode == 2, (proc.returncode, err)
    assert "HOPTRACE_DASHBOARD_DATABASE_URL" in err and "Traceback" not in err
    assert "Not-The-Default" not in out + err
    assert not (tmp_path / "ready").exists()
