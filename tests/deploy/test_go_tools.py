"""scripts/go-tools.sh: builds a tool once, then reuses it (no rebuild, same binary)."""

from __future__ import annotations

import subprocess

from .gotools import BIN, SCRIPT, go_tool, timeout_for

pytestmark = timeout_for("composecheck", 120)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600, check=False
    )


def test_second_run_reuses_the_cached_binary() -> None:
    binary = go_tool("composecheck")  # built (or already current)
    before = binary.stat().st_mtime_ns
    proc = run("composecheck")
    assert proc.returncode == 0, proc.stderr
    assert f"go-tools: composecheck up to date ({BIN}/composecheck), reused" in proc.stdout
    assert "building" not in proc.stdout
    assert binary.stat().st_mtime_ns == before


def test_unknown_tool_is_refused() -> None:
    proc = run("no-such-tool")
    assert proc.returncode == 2
    assert "unknown tool: no-such-tool" in proc.stderr
