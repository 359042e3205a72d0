"""A secret still holding the .env.example placeholder ("change-me...") is refused when any
hoptrace process starts (one clear line, exit 2, nothing else done): the ingest token, the OTLP
token the services send (``OTEL_EXPORTER_OTLP_HEADERS``), the owner's and the dashboard's
database passwords. In compose, `init` gets them all, so nothing of hoptrace starts with one."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.workers.harness import HOPTRACE

PLACEHOLDERS = {
    "HOPTRACE_INGEST_TOKEN": "change-me-ingest-token",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20change-me-otlp-token",
    "HOPTRACE_DATABASE_URL": "postgresql://hoptrace:change-me-owner@127.0.0.1:1/hoptrace",
    "HOPTRACE_DASHBOARD_DATABASE_URL": "postgresql://hoptrace_ro:change-me-readonly@db/hoptrace",
}


def _env(**extra: str) -> dict[str, str]:
    """No database or broker anything could reach (a start that is not refused fails fast)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOPTRACE_", "OTEL_"))}
    env["HOPTRACE_DATABASE_URL"] = "postgresql://hoptrace:x@127.0.0.1:1/hoptrace"
    env["HOPTRACE_KAFKA_BOOTSTRAP"] = "127.0.0.1:1"
    env["OTEL_TRACES_EXPORTER"] = "none"
    return {**env, **extra}


@pytest.mark.parametrize("var", sorted(PLACEHOLDERS))
@pytest.mark.parametrize("args", [["migrate"], ["collector"], ["worker", "purchase-worker"]])
def test_a_placeholder_secret_is_refused_at_start(var: str, args: list[str]) -> None:
    res = subprocess.run(
        [HOPTRACE, *args],
        env=_env(**{var: PLACEHOLDERS[var]}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and var in lines[0] and "placeholder" in lines[0], res.stderr
    assert "change-me-" not in lines[0]  # the value is not echoed


def test_real_secrets_and_help_are_not_refused() -> None:
    ok = {
        "HOPTRACE_INGEST_TOKEN": "a-real-token",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20a-real-token",
    }
    res = subprocess.run(
        [HOPTRACE, "migrate", "--help"], env=_env(**ok), capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [HOPTRACE, "collector", "--help"],
        env=_env(HOPTRACE_INGEST_TOKEN="change-me-ingest-token"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr  # help is not a start
