"""The dashboard through the collector's read API (``HOPTRACE_API_URL``) shows what it shows
through the database: a real `hoptrace collector` process serves the API over this test's
store, and the dashboard gets no usable database URL on the API path."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from hoptrace.dashboard.api_source import ApiSource
from hoptrace.dashboard.http_source import HttpSource
from hoptrace.dashboard.serve import APP

from ..support import free_port, isolated_spec, wait_for
from .apptest import show
from .seed import Seeded
from .test_browser import HOPTRACE

pytestmark = pytest.mark.stack

TOKEN = "dash-t0ken"


@pytest.fixture
def spec_path(tmp_path: Path, suffix: str) -> Path:
    """The reference spec with a 5 minute deadline on its second step: the in-progress payment
    stays in progress while the test compares the two paths."""
    path = isolated_spec(tmp_path, suffix)
    text = path.read_text()
    second = text.index("[[steps]]", text.index("[[steps]]") + 1)
    head, tail = text[:second], text[second:]
    path.write_text(head + re.sub(r'deadline = "[^"]+"', 'deadline = "5m"', tail, count=1))
    return path


@pytest.fixture
def api_url(seeded: Seeded, hoptrace_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`hoptrace collector` on free ports over this test's store, with an ingest token."""
    http = free_port()
    ready = tmp_path / "collector.ready"
    env = {
        **hoptrace_env,
        "HOPTRACE_OTLP_HTTP_PORT": str(http),
        "HOPTRACE_OTLP_GRPC_PORT": str(free_port()),
        "HOPTRACE_INGEST_TOKEN": TOKEN,
        "HOPTRACE_READY_FILE": str(ready),
    }
    log = (tmp_path / "collector.log").open("w")
    exe = str(HOPTRACE) if HOPTRACE.exists() else "hoptrace"
    proc = subprocess.Popen([exe, "collector"], env=env, stdout=log, stderr=subprocess.STDOUT)

    async def is_ready() -> bool:
        assert proc.poll() is None, (tmp_path / "collector.log").read_text()
        return ready.exists()

    try:
        asyncio.run(wait_for(is_ready, timeout=60, what="collector ready file"))
        yield f"http://127.0.0.1:{http}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        HttpSource._instances.clear()


def page(name: str | None, **query: str) -> AppTest:
    at = show(AppTest.from_file(str(APP), default_timeout=60), name, query)
    assert not at.exception, at.exception
    assert not [e.value for e in at.error if "Could not" in e.value or "token" in e.value]
    return at


def seen(at: AppTest) -> dict[str, Any]:
    """What a page shows that does not move with the clock."""
    frames = [d.value.drop(columns=["traces"], errors="ignore") for d in at.dataframe]
    return {
        "metrics": {m.label: m.value for m in at.metric},
        "frames": frames,
        "markdown": [m.value for m in at.markdown if "overdue by" not in m.value],
        "said": [e.value for e in [*at.error, *at.warning, *at.success, *at.info]],
        "graphs": [g.proto.spec for g in at.get("graphviz_chart")],
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["metrics"] == b["metrics"] and a["markdown"] == b["markdown"]
    assert a["said"] == b["said"]
    assert a["graphs"] == b["graphs"]
    assert len(a["frames"]) == len(b["frames"])
    for x, y in zip(a["frames"], b["frames"], strict=True):
        pd.testing.assert_frame_equal(x.reset_index(drop=True), y.reset_index(drop=True))


def test_every_page_shows_the_same_through_the_read_api(
    seeded: Seeded, api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    views = [
        ("payments", {"window": "1h"}),
        ("payments", {"state": "stalled,failed", "window": "1h"}),
        ("overview", {}),
        ("alerts", {}),
        (None, {"id": seeded.stalled[0]}),
        (None, {"id": seeded.completed[0]}),
    ]
    through_db = [seen(page(name, **q)) for name, q in views]
    ApiSource.close_all()
    monkeypatch.setenv("HOPTRACE_API_URL", api_url)
    monkeypatch.setenv("HOPTRACE_API_TOKEN", TOKEN)
    # no database on this path: a read through it would fail the page
    monkeypatch.setenv("HOPTRACE_DASHBOARD_DATABASE_URL", "postgresql://nobody:x@127.0.0.1:1/none")
    through_api = [seen(page(name, **q)) for name, q in views]
    for (name, q), a, b in zip(views, through_db, through_api, strict=True):
        try:
            same(a, b)
        except AssertionError as exc:
            raise AssertionError(f"page {name or 'lookup'} {q} differs: {exc}") from exc
    payments = through_api[1]["frames"][0]
    assert sorted(payments["payment"]) == sorted(seeded.stalled + seeded.failed)
    lookup = through_api[4]["markdown"]
    assert any("stalled (overdue) — **trainer.allocated**" in m for m in lookup), lookup
    assert HttpSource._instances, "the pages did not read through the API"


def test_a_wrong_token_is_said_on_the_page(
    seeded: Seeded, api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOPTRACE_API_URL", api_url)
    monkeypatch.setenv("HOPTRACE_API_TOKEN", "wrong")
    at = show(AppTest.from_file(str(APP), default_timeout=60), "payments", {})
    assert not at.exception
    assert "missing or invalid bearer token" in at.error[0].value
