"""deploy/postgres-init/10-hoptrace-readonly.sh (run by the postgres image on first start), run
here with psql against the real PostgreSQL on a fresh database: the dashboard's role can read
the tables the hoptrace role creates afterwards, and cannot write."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from urllib.parse import urlsplit

import asyncpg
import pytest

from hoptrace.settings import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "deploy" / "postgres-init" / "10-hoptrace-readonly.sh"
RO_PASSWORD = "hoptrace_ro"  # the local stack's read-only role (the script keeps an existing one)


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK), "docker-entrypoint-initdb.d only runs executable .sh"


def test_readonly_role_reads_later_tables_and_cannot_write(db_url: str) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.fail("psql is needed (Debian package postgresql-client)", pytrace=False)
    url = urlsplit(db_url)
    env = {
        "PATH": os.environ["PATH"],
        "PGHOST": url.hostname or "127.0.0.1",
        "PGPORT": str(url.port),
        "PGPASSWORD": url.password or "",
        "POSTGRES_USER": url.username or "",
        "POSTGRES_DB": url.path.lstrip("/"),
        "HOPTRACE_RO_PASSWORD": RO_PASSWORD,
    }
    proc = subprocess.run(
        ["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr

    async def exercise() -> None:
        owner = await asyncpg.connect(db_url)
        try:
            await owner.execute("CREATE TABLE later (id int); INSERT INTO later VALUES (1)")
        finally:
            await owner.close()
        ro_url = db_url.replace(f"{url.username}:{url.password}@", f"hoptrace_ro:{RO_PASSWORD}@")
        ro = await asyncpg.connect(ro_url)
        try:
            assert await ro.fetchval("SELECT count(*) FROM later") == 1
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await ro.execute("INSERT INTO later VALUES (2)")
        finally:
            await ro.close()

    asyncio.run(exercise())
