"""The command line lists every command group and reads its settings from the environment."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hoptrace.cli import app
from hoptrace.settings import Settings


def test_help_lists_every_command_group() -> None:
    out = CliRunner().invoke(app, ["--help"]).output
    for command in (
        "trace",
        "stalls",
        "collector",
        "worker",
        "dashboard",
        "topics",
        "check",
        "dev",
        "pay",
        "demo",
    ):
        assert command in out
    dev = CliRunner().invoke(app, ["dev", "--help"]).output
    for sub in ("up", "down", "status", "stop", "start"):
        assert sub in dev


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOPTRACE_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("HOPTRACE_INGEST_TOKEN", "s3cret")
    s = Settings()
    assert s.kafka_bootstrap == "kafka:9092"
    assert s.ingest_token == "s3cret"
    assert s.bind_host == "127.0.0.1"
    assert s.readonly_database_url().startswith("postgresql://hoptrace_ro:")


def test_local_defaults_point_at_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HOPTRACE_DATABASE_URL", "HOPTRACE_KAFKA_BOOTSTRAP"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert s.database_url.endswith("@127.0.0.1:55432/hoptrace")
    assert s.kafka_bootstrap == "127.0.0.1:59092"
    assert s.pipeline.name == "payments.toml" and s.pipeline.exists()


def test_unknown_dev_part_is_a_clear_error() -> None:
    res = CliRunner().invoke(app, ["dev", "stop", "no-such-part"])
    assert res.exit_code == 2
    assert "unknown part 'no-such-part'" in res.output


def test_worker_help_names_the_registry_s_services() -> None:
    from hoptrace.workers.registry import SERVICES

    out = " ".join(CliRunner().invoke(app, ["worker", "--help"]).output.split())
    for name in SERVICES:
        assert name in out


def test_dev_start_checks_the_fault_against_the_registry() -> None:
    res = CliRunner().invoke(app, ["dev", "start", "allocation-worker", "--fault", "http-500"])
    assert res.exit_code == 2
    assert "allowed: no-verify, wrong-group, slow, crash-after-write" in res.output
    res = CliRunner().invoke(app, ["dev", "start", "collector", "--fault", "slow"])
    assert res.exit_code == 2
    assert "collector has no fault switches" in res.output
