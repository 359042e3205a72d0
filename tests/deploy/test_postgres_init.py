"""deploy/postgres-init/10-hoptrace-roles.sh (run by the postgres image on its first start, as
the cluster's superuser), run here with psql against the real PostgreSQL as its superuser, with
its roles and database renamed for the test: the owner role is no superuser and owns its
database; the dashboard's role reads the tables the owner creates afterwards and cannot write;
a placeholder password from .env.example is refused before anything is created."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import pytest

from hoptrace import devstack
from hoptrace.settings import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "deploy" / "postgres-init" / "10-hoptrace-roles.sh"


@dataclass
class Names:
    owner: str
    db: str
    ro: str
    owner_password: str = f"Ow{uuid.uuid4().hex}"
    ro_password: str = f"Ro{uuid.uuid4().hex}"


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK), "docker-entrypoint-initdb.d only runs executable .sh"


@pytest.fixture
def superuser_url(stack: devstack.StackConfig) -> str:
    return devstack.PostgresPart(stack).superuser_url()


@pytest.fixture
def names(superuser_url: str) -> Iterator[Names]:
    tag = uuid.uuid4().hex[:8]
    n = Names(owner=f"own_{tag}", db=f"db_{tag}", ro=f"ro_{tag}")
    yield n

    async def drop() -> None:
        conn = await asyncpg.connect(superuser_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{n.db}" WITH (FORCE)')
            for role in (n.ro, n.owner):
                if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                    await conn.execute(f'DROP OWNED BY "{role}"')
                    await conn.execute(f'DROP ROLE "{role}"')
        finally:
            await conn.close()

    asyncio.run(drop())


def run_script(superuser_url: str, names: Names, **override: str) -> subprocess.CompletedProcess:
    psql = shutil.which("psql")
    if psql is None:
        pytest.fail("psql is needed (Debian package postgresql-client)", pytrace=False)
    url = urlsplit(superuser_url)
    env = {
        "PATH": os.environ["PATH"],
        "PGHOST": url.hostname or "127.0.0.1",
        "PGPORT": str(url.port),
        "PGPASSWORD": url.password or "",
        "POSTGRES_USER": url.username or "",
        "POSTGRES_DB": url.path.lstrip("/"),
        "POSTGRES_PASSWORD": "the-superuser-password",
        "HOPTRACE_DB_OWNER": names.owner,
        "HOPTRACE_DB_NAME": names.db,
        "HOPTRACE_RO_ROLE": names.ro,
        "HOPTRACE_DB_PASSWORD": names.owner_password,
        "HOPTRACE_RO_PASSWORD": names.ro_password,
        **override,
    }
    return subprocess.run(
        ["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_owner_is_no_superuser_and_readonly_role_reads_later_tables(
    superuser_url: str, names: Names
) -> None:
    proc = run_script(superuser_url, names)
    assert proc.returncode == 0, proc.stderr
    host = urlsplit(superuser_url).netloc.rsplit("@", 1)[1]
    owner_url = f"postgresql://{names.owner}:{names.owner_password}@{host}/{names.db}"
    ro_url = f"postgresql://{names.ro}:{names.ro_password}@{host}/{names.db}"

    async def exercise() -> None:
        owner = await asyncpg.connect(owner_url)
        try:
            role = await owner.fetchrow(
                "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                "WHERE rolname = current_user"
            )
            assert tuple(role) == (False, False, False)
            assert (
                await owner.fetchval(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", names.db
                )
                == names.owner
            )
            await owner.execute("CREATE TABLE later (id int); INSERT INTO later VALUES (1)")
        finally:
            await owner.close()
        ro = await asyncpg.connect(ro_url)
        try:
            assert await ro.fetchval("SELECT count(*) FROM later") == 1
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await ro.execute("INSERT INTO later VALUES (2)")
            assert (
                await ro.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                is False
            )
        finally:
            await ro.close()

    asyncio.run(exercise())
    # a second run (a restarted container never runs it, but it must not fail if it did)
    assert run_script(superuser_url, names).returncode == 0


@pytest.mark.parametrize(
    "var", ["POSTGRES_PASSWORD", "HOPTRACE_DB_PASSWORD", "HOPTRACE_RO_PASSWORD"]
)
def test_a_placeholder_or_empty_password_is_refused(
    superuser_url: str, names: Names, var: str
) -> None:
    for value in ("change-me-please", ""):
        proc = run_script(superuser_url, names, **{var: value})
        assert proc.returncode != 0
        assert var in proc.stderr and ("placeholder" in proc.stderr or "empty" in proc.stderr)

    async def created() -> bool:
        conn = await asyncpg.connect(superuser_url)
        try:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])",
                    [names.owner, names.ro],
                )
            )
        finally:
            await conn.close()

    assert not asyncio.run(created())
