"""Every service listens on 127.0.0.1 by default (its listening sockets read from /proc), and no
secret (the database password, the ingest token) appears in any service's output."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from benchmarks.otlp_fuzz import CollectorProc, valid_request
from tests.support import delete_topics, free_port
from tests.workers.harness import HOPTRACE, Services, service_env

PASSWORD = f"Pw{uuid.uuid4().hex}"
TOKEN = f"Tk{uuid.uuid4().hex}"


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets ``pid`` listens on (IPv4 and IPv6, from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            hexip, hexport = f[1].split(":")
            if v6:
                words = [hexip[i : i + 8] for i in range(0, 32, 8)]
                raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
                import ipaddress

                ip = ipaddress.IPv6Address(raw)
                addr = str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)
            else:
                addr = ".".join(str(b) for b in bytes.fromhex(hexip)[::-1])
            out.add((addr, int(hexport, 16)))
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and its child processes (the dashboard runs streamlit as a child)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@pytest.fixture
def secret_db(db_url: str) -> Iterator[str]:
    """The per-test database owned by a role whose password is distinctive."""
    role = f"sec_{uuid.uuid4().hex[:8]}"
    name = db_url.rsplit("/", 1)[1]

    async def setup() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
            # the owner role is no superuser: it must be a member of a role to give it a database
            await conn.execute(f"GRANT {role} TO CURRENT_USER")
            await conn.execute(f'ALTER DATABASE "{name}" OWNER TO {role}')
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(f"REASSIGN OWNED BY {role} TO hoptrace")
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f'ALTER DATABASE "{name}" OWNER TO hoptrace')
            await conn.execute(f"DROP ROLE {role}")
        finally:
            await conn.close()

    asyncio.run(setup())
    base, _, _ = db_url.rpartition("@")
    yield db_url.replace(base, f"postgresql://{role}:{PASSWORD}", 1)
    asyncio.run(teardown())


def test_services_bind_localhost_and_log_no_secret(
    secret_db: str, kafka_bootstrap: str, spec_path: Path, tmp_path: Path
) -> None:
    env = service_env(secret_db, kafka_bootstrap, spec_path, None)
    env.pop("HOPTRACE_BIND_HOST", None)  # the default
    env["HOPTRACE_INGEST_TOKEN"] = TOKEN
    res = subprocess.run([HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    collector = CollectorProc(secret_db, spec_path, tmp_path, token=TOKEN)
    collector.start()
    services = Services(env, tmp_path)
    dash_log = tmp_path / "dashboard.log"
    dash = None
    try:
        for name in ("admin-service", "payment-service", "purchase-worker"):
            services.start(name)
        ready = tmp_path / "dashboard.ready"
        # the dashboard's own read-only URL (it refuses to start without one)
        base, _, rest = secret_db.partition("://")
        ro_url = f"{base}://hoptrace_ro:hoptrace_ro@{rest.split('@', 1)[1]}"
        with open(dash_log, "ab") as log:
            dash = subprocess.Popen(
                [HOPTRACE, "dashboard", "--port", str(free_port())],
                env={
                    **env,
                    "HOPTRACE_READY_FILE": str(ready),
                    "HOPTRACE_DASHBOARD_DATABASE_URL": ro_url,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert dash.poll() is None, dash_log.read_text()
            assert time.monotonic() < deadline, "dashboard not ready"
            time.sleep(0.1)

        # exercise paths that log: a bad token, a good export, a payment, a bad request
        with httpx.Client(timeout=10) as client:
            pb = {"content-type": "application/x-protobuf"}
            body = valid_request(random.Random(1))
            assert client.post(f"{collector.http}/v1/traces", content=body).status_code == 401
            r = client.post(
                f"{collector.http}/v1/traces",
                content=body,
                headers={**pb, "authorization": f"Bearer {TOKEN}"},
            )
            assert r.status_code == 200
            pay = f"http://127.0.0.1:{env['HOPTRACE_PAYMENT_SERVICE_PORT']}/payments"
            r = client.post(pay, json={"student": "student-1", "course": "course-1", "amount": "5"})
            assert r.status_code == 201, r.text
            assert client.post(pay, content=b"{").status_code == 422

        # listening sockets: all on 127.0.0.1
        procs = {
            "collector": collector.proc.pid,
            "admin-service": services.procs["admin-service"].pid,
            "payment-service": services.procs["payment-service"].pid,
            "dashboard": dash.pid,
        }
        seen = {}
        for name, pid in procs.items():
            socks = set().union(*(listening(p) for p in descendants(pid)))
            assert socks, f"{name} listens on nothing?"
            seen[name] = socks
        for name, socks in seen.items():
            assert {a for a, _ in socks} == {"127.0.0.1"}, (name, socks)
        assert {a for a, _ in listening(services.procs["purchase-worker"].pid)} <= {"127.0.0.1"}
        assert (
            "127.0.0.1",
            collector.grpc_port,
        ) in seen["collector"] and ("127.0.0.1", collector.http_port) in seen["collector"]
    finally:
        if dash is not None:
            dash.terminate()
            dash.wait(20)
        services.stop_all()
        collector.stop()
        from hoptrace.contract import load_spec

        asyncio.run(delete_topics(kafka_bootstrap, load_spec(spec_path).topics))

    # a start that fails on the database: its error must not echo the URL's password
    bad = secret_db.rsplit("@", 1)[0] + "@127.0.0.1:1/nodb"
    res = subprocess.run(
        [HOPTRACE, "collector"],
        env={
            **env,
            "HOPTRACE_DATABASE_URL": bad,
            "HOPTRACE_OTLP_HTTP_PORT": "0",
            "HOPTRACE_OTLP_GRPC_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    failed_start = res.stdout + res.stderr
    res = subprocess.run(
        [HOPTRACE, "trace", "some-id"],
        env={**env, "HOPTRACE_DATABASE_URL": bad},
        capture_output=True,
        text=True,
        timeout=60,
    )
    failed_start += res.stdout + res.stderr

    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    logs["failed-start"] = failed_start
    assert set(logs) >= {
        "collector.log",
        "admin-service.log",
        "payment-service.log",
        "purchase-worker.log",
        "dashboard.log",
    }
    for name, text in logs.items():
        assert PASSWORD not in text, f"database password in {name}"
        assert TOKEN not in text, f"ingest token in {name}"
