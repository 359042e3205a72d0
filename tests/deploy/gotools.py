"""The Go tools the deploy tests run (built once by scripts/go-tools.sh, cached in
.hoptrace/tools/bin). A missing tool is built here; a failed build fails the test loudly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hoptrace.settings import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "go-tools.sh"
#: Where scripts/go-tools.sh puts the tools (its HOPTRACE_TOOLS_BIN, default .hoptrace/tools/bin).
BIN = Path(os.environ.get("HOPTRACE_TOOLS_BIN") or PROJECT_ROOT / ".hoptrace" / "tools" / "bin")
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
OTELCOL_CONFIG = PROJECT_ROOT / "collector" / "otelcol-config.yaml"
OTELCOL_KAFKA_OVERLAY = PROJECT_ROOT / "collector" / "otelcol-kafka-spans.yaml"


#: pytest-timeout for a test that may have to build its Go tool first (a cold jaeger build takes
#: about 11 minutes on 2 busy cores); prebuild with scripts/go-tools.sh to keep tests short.
BUILD_TIMEOUT_S = 2400


def built(name: str) -> bool:
    """The tool exists with a build stamp (it may still be rebuilt if its sources changed)."""
    return (BIN / name).exists() and (BIN / f".{name}.stamp").exists()


def timeout_for(name: str, run_s: int) -> pytest.MarkDecorator:
    """``pytest.mark.timeout`` that allows a build when the tool is not built yet."""
    return pytest.mark.timeout(run_s if built(name) else run_s + BUILD_TIMEOUT_S)


def go_tool(name: str) -> Path:
    """Path of the built tool; runs scripts/go-tools.sh NAME (a no-op when cached and current)."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), name],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    path = BIN / name
    if proc.returncode != 0 or not path.exists():
        pytest.fail(
            f"scripts/go-tools.sh {name} failed (exit {proc.returncode}); the Go tool {name!r} is "
            f"needed for this test.\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return path


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal environment, so a developer's own HOPTRACE_*/POSTGRES_* values cannot leak in."""
    import os

    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(extra or {})
    return env
