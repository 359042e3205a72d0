"""`hoptrace dev up|status|down` on a private second stack (own folder, own ports, the shared jar
cache), so the shared stack other tests use is never touched."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoptrace import devstack, devstack_kafka
from hoptrace.settings import PROJECT_ROOT

from ..support import free_port


def _hoptrace(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hoptrace.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _our_processes(home: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(home) in cmd:
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def private_stack(stack: devstack.StackConfig) -> Iterator[tuple[dict[str, str], Path]]:
    # Under the project's ignored folder: the non-root PostgreSQL user must be able to reach it.
    home = PROJECT_ROOT / ".hoptrace" / "test-stacks" / os.urandom(4).hex()
    env = {
        **os.environ,
        "HOPTRACE_HOME": str(home),
        "HOPTRACE_DEV_CACHE": str(stack.cache_dir),
        "HOPTRACE_DEV_PG_PORT": str(free_port()),
        "HOPTRACE_DEV_KAFKA_PORT": str(free_port()),
        "HOPTRACE_DEV_CONTROLLER_PORT": str(free_port()),
    }
    yield env, home
    _hoptrace(env, "dev", "down")
    shutil.rmtree(home, ignore_errors=True)


def _pids(status_out: str) -> dict[str, str]:
    out = {}
    for line in status_out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "pid":
            out[parts[0]] = parts[3]
    return out


def test_up_twice_is_a_no_op_and_down_leaves_nothing(
    private_stack: tuple[dict[str, str], Path],
) -> None:
    env, home = private_stack
    first = _hoptrace(env, "dev", "up", "--infra-only")
    assert first.returncode == 0, first.stderr
    assert "postgres" in first.stdout and "started" in first.stdout
    status1 = _hoptrace(env, "dev", "status")
    assert status1.returncode == 0, status1.stdout
    pids1 = _pids(status1.stdout)
    assert pids1["postgres"].isdigit() and pids1["kafka"].isdigit()
    assert "stopped" in status1.stdout  # services nobody started are not "down"

    second = _hoptrace(env, "dev", "up", "--infra-only")
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already up") == 2
    assert _pids(_hoptrace(env, "dev", "status").stdout) == pids1

    down = _hoptrace(env, "dev", "down")
    assert down.returncode == 0
    assert "kafka              stopped" in down.stdout
    assert _our_processes(home) == []
    status3 = _hoptrace(env, "dev", "status")
    assert status3.returncode == 3 and "down" in status3.stdout
    assert (home / "pg" / "PG_VERSION").exists(), "down must keep the data"


def test_the_owner_role_is_no_superuser_and_every_login_needs_a_password(
    private_stack: tuple[dict[str, str], Path],
) -> None:
    """Fix: initdb made the owner role ``hoptrace`` the cluster's superuser and trusted every
    login on the local socket. Now a separate superuser provisions the roles: the owner may
    create databases and roles (the tests create both) but is no superuser, and the local
    socket asks for a password like TCP does."""
    import asyncio

    import asyncpg

    env, home = private_stack
    res = _hoptrace(env, "dev", "up", "--infra-only")
    assert res.returncode == 0, res.stderr
    port = int(env["HOPTRACE_DEV_PG_PORT"])
    cfg = devstack.StackConfig(home=home, pg_port=port)

    async def check() -> None:
        owner = await asyncpg.connect(cfg.database_url)
        try:
            role = await owner.fetchrow(
                "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                "WHERE rolname = current_user"
            )
            assert tuple(role) == (False, True, True)
            assert await owner.fetchval("SELECT current_database()") == "hoptrace"
            await owner.execute('CREATE DATABASE "owner_made_this"')
            await owner.execute('DROP DATABASE "owner_made_this"')
        finally:
            await owner.close()
        ro = await asyncpg.connect(cfg.readonly_database_url)
        try:
            assert (
                await ro.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                is False
            )
        finally:
            await ro.close()
        # the local socket: a login without the password is refused
        with pytest.raises(
            (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
        ):
            await asyncpg.connect(
                host=str(home / "pg-run"), port=port, user="hoptrace", database="hoptrace"
            )

    asyncio.run(check())


def test_killed_broker_shows_down_and_up_brings_it_back(
    private_stack: tuple[dict[str, str], Path],
) -> None:
    env, home = private_stack
    assert _hoptrace(env, "dev", "up", "--infra-only").returncode == 0
    kafka_pid = int(_pids(_hoptrace(env, "dev", "status").stdout)["kafka"])
    os.killpg(kafka_pid, 9)
    status = _hoptrace(env, "dev", "status")
    assert status.returncode == 3
    assert [ln for ln in status.stdout.splitlines() if ln.startswith("kafka")][0].split()[
        1
    ] == "down"
    again = _hoptrace(env, "dev", "up", "--infra-only")
    assert again.returncode == 0, again.stderr
    assert _hoptrace(env, "dev", "status").returncode == 0


def test_port_taken_is_one_clear_line(private_stack: tuple[dict[str, str], Path]) -> None:
    env, _home = private_stack
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(env["HOPTRACE_DEV_PG_PORT"])))
        squatter.listen()
        res = _hoptrace(env, "dev", "up", "--infra-only")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "port" in lines[0] and "already taken" in lines[0]


def test_foreign_data_folder_is_refused_and_kept(
    private_stack: tuple[dict[str, str], Path],
) -> None:
    env, home = private_stack
    foreign = home / "pg"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("not yours")
    res = _hoptrace(env, "dev", "up", "--infra-only")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "will not delete it" in res.stderr
    assert (foreign / "precious.txt").read_text() == "not yours"


def test_missing_java_is_one_clear_line(
    private_stack: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, _home = private_stack
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("runuser", "useradd"):  # keep what PostgreSQL needs, hide java
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {**env, "PATH": str(bin_dir)}
    res = _hoptrace(env, "dev", "up", "--infra-only")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "`java` not found" in res.stderr


def test_kafka_cluster_ids_never_read_as_options() -> None:
    """A cluster id starting with "-" made kafka-storage read it as an option (1 format in 64
    failed): ids are drawn as Kafka draws them, and passed attached to their flag."""
    ids = [devstack_kafka.cluster_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)
