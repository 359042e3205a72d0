"""hoptrace installed outside a checkout: a wheel built here, installed into a fresh virtualenv
in a temporary folder, run from a folder that is no checkout. `hoptrace --version`; `hoptrace
migrate --span-store-only` creates the span store and nothing of the reference pipeline; the
collector needs HOPTRACE_PIPELINE (a clear error without it), then starts, is ready and stops on
SIGTERM; `hoptrace trace` of an unknown id answers `{"found": false}` with exit 2; the reference
spec ships in the package and is the reference services' default."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from hoptrace import devstack
from hoptrace.settings import PROJECT_ROOT

from ..support import free_port, isolated_spec, unique
from .wheel import Installed, build_wheels, clean_env, install

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory, stack: devstack.StackConfig
) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel-install")
    t0 = time.monotonic()
    wheels, native = build_wheels(root / "dist", root)
    built = time.monotonic() - t0
    took = install(wheels, root / "venv", stack.cache_dir / "wheelhouse")
    inst = Installed(root / "venv", wheels, native, {"build": built, **took})
    print(f"\nwheel install: {', '.join(f'{k} {v:.1f}s' for k, v in inst.took.items())}")
    yield inst


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working folder that is no checkout (and not below one)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert PROJECT_ROOT not in cwd.resolve().parents
    return cwd


def run(
    inst: Installed, cwd: Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [inst.hoptrace, *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(1800)
def test_the_wheel_is_the_whole_program(installed: Installed, outside: Path) -> None:
    names = {w.name.split("-")[0] for w in installed.wheels}
    assert "hoptrace" in names and (("hoptrace_native" in names) == installed.native)
    (wheel,) = [w for w in installed.wheels if w.name.startswith("hoptrace-")]
    files = set(zipfile.ZipFile(wheel).namelist())
    assert {"hoptrace/pipelines/payments.toml", "hoptrace/stack/jaeger.yaml"} <= files
    version = run(installed, outside, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "hoptrace 0.1.0"
    probe = subprocess.run(
        [
            installed.python,
            "-c",
            "import hoptrace, hoptrace.settings as s; print(hoptrace.__file__); "
            "print(s.IN_CHECKOUT); print(s.WorkerSettings().pipeline); "
            "print(s.PACKAGED_SPEC.read_text() == open(s.WorkerSettings().pipeline).read())",
        ],
        cwd=outside,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    where, in_checkout, worker_spec, same = probe.stdout.split()
    assert Path(where).is_relative_to(installed.venv) and in_checkout == "False"
    assert Path(worker_spec).is_relative_to(installed.venv) and same == "True"
    assert Path(worker_spec).read_text() == (PROJECT_ROOT / "pipelines/payments.toml").read_text()
    if installed.native:
        native = subprocess.run(
            [installed.python, "-c", "import hoptrace_native"], env=clean_env(), check=False
        )
        assert native.returncode == 0


def test_migrate_span_store_only_creates_no_reference_table(
    installed: Installed, outside: Path, db_url: str
) -> None:
    res = run(installed, outside, "migrate", "--span-store-only", HOPTRACE_DATABASE_URL=db_url)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "span store: migrated"

    async def tables() -> set[str]:
        conn = await asyncpg.connect(db_url)
        try:
            rows = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
            return {r["tablename"] for r in rows}
        finally:
            await conn.close()

    have = asyncio.run(tables())
    assert {"spans", "correlations"} <= have
    assert not have & {"payments", "processed_events", "student_course_purchases"}, have


def test_the_collector_needs_a_spec_then_runs_and_stops_on_sigterm(
    installed: Installed, outside: Path, db_url: str, kafka_bootstrap: str
) -> None:
    base = {"HOPTRACE_DATABASE_URL": db_url, "HOPTRACE_KAFKA_BOOTSTRAP": kafka_bootstrap}
    ports = {
        "HOPTRACE_OTLP_GRPC_PORT": str(free_port()),
        "HOPTRACE_OTLP_HTTP_PORT": str(free_port()),
    }
    unset = run(installed, outside, "collector", timeout=60, **base, **ports)
    assert unset.returncode == 2
    lines = [ln for ln in unset.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "HOPTRACE_PIPELINE is not set" in lines[0], unset.stderr
    assert "Traceback" not in unset.stderr

    spec = isolated_spec(outside, unique(""))  # the user's own spec file, outside the checkout
    ready = outside / "collector.ready"
    env = clean_env(**base, **ports, HOPTRACE_PIPELINE=str(spec), HOPTRACE_READY_FILE=str(ready))
    log = outside / "collector.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [installed.hoptrace, "collector"], cwd=outside, env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"collector not ready in 60s\n{log.read_text()}"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{ports['HOPTRACE_OTLP_HTTP_PORT']}"
        assert httpx.get(f"{url}/readyz", timeout=5, trust_env=False).status_code == 200
        assert httpx.get(f"{url}/healthz", timeout=5, trust_env=False).status_code == 200

        unknown = run(
            installed, outside, "trace", "pay-not-known-anywhere", "--format", "json",
            timeout=60, **base, HOPTRACE_PIPELINE=str(spec),
        )  # fmt: skip
        assert unknown.returncode == 2, unknown.stderr
        doc = json.loads(unknown.stdout)
        assert doc["found"] is False and doc["correlation_id"] == "pay-not-known-anywhere"
        assert doc["jaeger_urls"] == [] and "no payment with id" in unknown.stderr
        text = run(
            installed, outside, "trace", "pay-not-known-anywhere", timeout=60, **base,
            HOPTRACE_PIPELINE=str(spec),
        )  # fmt: skip
        assert text.returncode == 2 and text.stdout == ""
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()
