"""The command line lists every command group and reads its settings from the environment."""

from __future__ import annotations

import os
import subprocess
import sys

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


def _help(*args: str) -> str:
    """A command's help as one line of words (the help's box and line breaks removed)."""
    out = CliRunner().invoke(app, [*args, "--help"]).output
    return " ".join(out.replace("│", " ").split())


def test_version_is_the_installed_distribution_s() -> None:
    from importlib.metadata import version

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"hoptrace {version('hoptrace')}"


def test_dev_start_and_stop_help_list_the_parts_and_each_service_s_faults() -> None:
    from hoptrace.workers.registry import FAULTS

    parts = ["postgres", "kafka", "jaeger", "collector", "dashboard", *FAULTS]
    for command in ("start", "stop"):
        out = _help("dev", command)
        assert not [name for name in parts if name not in out], (command, out)
    start = _help("dev", "start")
    for service, values in FAULTS.items():
        assert f"{service}: {', '.join(values)}" in start, service


def test_a_malformed_setting_is_one_line_not_a_traceback() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "hoptrace.cli", "topics", "ensure"],
        env={**os.environ, "HOPTRACE_KAFKA_SECURITY_PROTOCOL": "SASL_FOO"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "invalid setting: HOPTRACE_KAFKA_SECURITY_PROTOCOL" in res.stderr
