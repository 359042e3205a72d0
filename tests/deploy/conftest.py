"""Fixtures of the deploy tests: the compose file as resolved by compose-go (the loader of
`docker compose`), with .env.example as the environment."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .gotools import COMPOSE_FILE, ENV_EXAMPLE, clean_env, go_tool
from .jaeger import Jaeger, start_jaeger


@pytest.fixture(scope="session")
def composecheck() -> Path:
    return go_tool("composecheck")


@pytest.fixture(scope="session")
def project(composecheck: Path) -> dict[str, Any]:
    """`docker compose config --format json` equivalent: schema-validated, anchors merged,
    variables interpolated from .env.example."""
    proc = subprocess.run(
        [str(composecheck), "--env-file", str(ENV_EXAMPLE), "--json", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def services(project: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return project["services"]


@pytest.fixture(scope="session")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    """One real Jaeger v2 for the session (tests use their own correlation ids)."""
    j = start_jaeger(tmp_path_factory.mktemp("jaeger"))
    try:
        yield j
    finally:
        j.stop()
