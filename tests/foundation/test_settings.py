"""Each component's settings come from its ``HOPTRACE_*`` variables: the local stack's
(``HOPTRACE_HOME``, ``HOPTRACE_DEV_*``), the reference services' (fault switch, slow delay) and
a started process's ready file; the shared ones stay in :class:`Settings`."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoptrace.devstack import StackConfig
from hoptrace.readiness import clear_ready, mark_ready
from hoptrace.settings import PROJECT_ROOT, Settings, WorkerSettings


def test_stack_config_reads_home_and_dev_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in ("HOPTRACE_HOME", "HOPTRACE_DEV_PG_PORT", "HOPTRACE_DEV_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOPTRACE_DEV_CACHE", "")
    default = StackConfig.from_env()
    assert default.home == PROJECT_ROOT / ".hoptrace"
    assert default.cache is None and default.cache_dir == default.home / "cache"
    assert default.pg_port == 55432 and default.timeout == 90.0

    monkeypatch.setenv("HOPTRACE_HOME", str(tmp_path))
    monkeypatch.setenv("HOPTRACE_DEV_CACHE", str(tmp_path / "jars"))
    monkeypatch.setenv("HOPTRACE_DEV_PG_PORT", "61234")
    monkeypatch.setenv("HOPTRACE_DEV_KAFKA_PORT", "61235")
    monkeypatch.setenv("HOPTRACE_DEV_CONTROLLER_PORT", "61236")
    monkeypatch.setenv("HOPTRACE_DEV_TIMEOUT", "12.5")
    cfg = StackConfig.from_env()
    assert (cfg.home, cfg.cache_dir, cfg.timeout) == (tmp_path, tmp_path / "jars", 12.5)
    assert cfg.database_url.endswith("@127.0.0.1:61234/hoptrace")
    assert cfg.kafka_bootstrap == "127.0.0.1:61235" and cfg.controller_port == 61236


def test_worker_settings_add_the_fault_switch_to_the_shared_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOPTRACE_FAULT", "")
    monkeypatch.delenv("HOPTRACE_SLOW_DELAY_S", raising=False)
    s = WorkerSettings()
    assert s.fault is None and s.slow_delay_s == 3.0
    assert s.database_url == Settings().database_url
    monkeypatch.setenv("HOPTRACE_FAULT", "slow")
    monkeypatch.setenv("HOPTRACE_SLOW_DELAY_S", "0.5")
    s = WorkerSettings()
    assert (s.fault, s.slow_delay_s) == ("slow", 0.5)


def test_ready_file_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ready = tmp_path / "run" / "svc.ready"
    monkeypatch.setenv("HOPTRACE_READY_FILE", str(ready))
    mark_ready()
    assert ready.read_text().isdigit()
    clear_ready()
    assert not ready.exists()


def test_the_dashboard_url_is_never_derived_from_the_owner_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fix: the read-only URL was the owner's with the text ``hoptrace:hoptrace@`` replaced;
    with any other password nothing was replaced and the dashboard connected as the owner (a
    superuser). Now: ``HOPTRACE_DASHBOARD_DATABASE_URL``, or the local stack's read-only role
    when ``HOPTRACE_DATABASE_URL`` is not set either, else a clear refusal."""
    from hoptrace.settings import MissingDashboardDatabaseUrl

    for key in ("HOPTRACE_DATABASE_URL", "HOPTRACE_DASHBOARD_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    local = Settings().readonly_database_url()
    assert local == "postgresql://hoptrace_ro:hoptrace_ro@127.0.0.1:55432/hoptrace"

    monkeypatch.setenv("HOPTRACE_DATABASE_URL", "postgresql://hoptrace:s3cret@db:5432/hoptrace")
    with pytest.raises(MissingDashboardDatabaseUrl) as err:
        Settings().readonly_database_url()
    assert "HOPTRACE_DASHBOARD_DATABASE_URL" in str(err.value)
    assert "s3cret" not in str(err.value)
    # the local owner URL spelled out is not a licence to derive either
    monkeypatch.setenv("HOPTRACE_DATABASE_URL", Settings().database_url)
    with pytest.raises(MissingDashboardDatabaseUrl):
        Settings().readonly_database_url()

    ro = "postgresql://reader:pw@db:5432/hoptrace"
    monkeypatch.setenv("HOPTRACE_DASHBOARD_DATABASE_URL", ro)
    assert Settings().readonly_database_url() == ro


#: The one product module that reads a HOPTRACE_ variable from the environment itself: the local
#: stack passes the user's own HOPTRACE_EXPORT_ALSO through to the processes it starts.
PASS_THROUGH = {"core/devstack_process.py"}


def test_no_product_module_reads_a_hoptrace_variable_past_its_settings() -> None:
    import re

    direct = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']HOPTRACE_""")
    found = []
    for folder in ("core", "collector", "dashboard", "instrumentation", "workers", "repair"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            rel = path.relative_to(PROJECT_ROOT).as_posix()
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if direct.search(line) and rel not in PASS_THROUGH:
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "read through a settings class instead:\n" + "\n".join(found)


def test_api_and_redrive_settings_come_from_their_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hoptrace.settings import ApiClientSettings, RedriveSettings

    monkeypatch.setenv("HOPTRACE_API_URL", " http://collector:4318 ")
    monkeypatch.setenv("HOPTRACE_API_TOKEN", "")
    monkeypatch.setenv("HOPTRACE_REDRIVE_URL", "http://collector:4318")
    monkeypatch.delenv("HOPTRACE_REDRIVE_TOKEN", raising=False)
    api, redrive = ApiClientSettings(), RedriveSettings()
    assert (api.api_url, api.api_token) == ("http://collector:4318", None)
    assert not redrive.dashboard_can_redrive
    monkeypatch.setenv("HOPTRACE_REDRIVE_TOKEN", "s3cret")
    assert RedriveSettings().dashboard_can_redrive
