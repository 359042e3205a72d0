"""`hoptrace dashboard`: run the Streamlit app (headless, no usage stats) and signal readiness;
refuse to start without the dashboard's read-only database URL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hoptrace.readiness import mark_ready
from hoptrace.settings import MissingDashboardDatabaseUrl, get_settings

APP = Path(__file__).resolve().parent / "app.py"
#: Streamlit's ``/_stcore/health`` body when the server is up.
_HEALTHY = b"ok"
STARTUP_TIMEOUT_S = 60.0


def command(host: str, port: int) -> list[str]:
    """The ``streamlit run`` command line for the app."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    """Poll ``/_stcore/health`` until it answers ``ok``; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).content.strip() == _HEALTHY:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def main(port: int | None = None) -> None:
    """Run the dashboard in the foreground until it stops or is signalled. Refuses to start
    (exit 2) without a read-only database URL: it never reads as the owner role."""
    settings = get_settings()
    try:
        settings.readonly_database_url()
    except MissingDashboardDatabaseUrl as exc:
        print(f"hoptrace: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    port = port or settings.dashboard_port
    host = settings.bind_host
    proc = subprocess.Popen(command(host, port))

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    health = f"http://{host}:{port}/_stcore/health"
    if wait_healthy(proc, health, STARTUP_TIMEOUT_S):
        mark_ready()
        print(f"hoptrace dashboard on http://{host}:{port}", file=sys.stderr, flush=True)
    elif proc.poll() is None:
        print(f"dashboard did not become healthy at {health}", file=sys.stderr)
        proc.terminate()
        proc.wait(10)
        raise SystemExit(1)
    code = proc.wait()
    raise SystemExit(0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code)
