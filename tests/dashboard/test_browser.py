"""A real `hoptrace dashboard` process, opened by headless Chromium: look up a stalled payment
(its timeline's labels never overlap), the overview, and the Payments page with its filters in
the URL. The screenshots are the README's (``docs/screenshots/``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoptrace.settings import PROJECT_ROOT

from ..support import free_port, wait_for
from .cdp import Browser, chromium_path
from .seed import Seeded

pytestmark = [pytest.mark.stack]


@pytest.fixture(autouse=True)
def _chromium_installed() -> None:
    # never skipped: `make test` installs it (scripts/bootstrap.sh -> scripts/browser.sh)
    assert chromium_path() is not None, "chromium missing: run scripts/browser.sh"


ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
HOPTRACE = Path(os.environ.get("VIRTUAL_ENV", PROJECT_ROOT / ".venv")) / "bin" / "hoptrace"


@pytest.fixture
def dashboard(seeded: Seeded, hoptrace_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`hoptrace dashboard --port P` on this test's database; its URL once it signalled ready."""
    port = free_port()
    ready = tmp_path / "dashboard.ready"
    env = {**hoptrace_env, "HOPTRACE_READY_FILE": str(ready)}
    exe = str(HOPTRACE) if HOPTRACE.exists() else "hoptrace"
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(
        [exe, "dashboard", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )

    async def is_ready() -> bool:
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        return ready.exists()

    try:
        asyncio.run(wait_for(is_ready, timeout=60, what="dashboard ready file"))
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    # stopped, it closed the Kafka clients its lookups opened
    text = (tmp_path / "dashboard.log").read_text(errors="replace")
    assert "Unclosed AIOKafkaConsumer" not in text, text[-2000:]


def test_browser_looks_up_a_stalled_payment(dashboard: str, seeded: Seeded) -> None:
    cid = seeded.stalled[0]
    with Browser(height=1800) as browser:
        browser.open(f"{dashboard}/?id={cid}")
        # Streamlit renders each element on its own (a list's markdown can land after the
        # elements below it): wait for everything asserted on, not just the last heading
        text = browser.wait_for_text(
            f"Payment {cid}",
            "⟵ ⛔ STOPPED HERE",
            "payment.confirmed",
            "session.created",
            "Traces in Jaeger",
        )
        browser.wait_for_selector(".js-plotly-plot .main-svg")  # the Gantt
        browser.wait_for_selector("[data-testid='stDataFrame'] canvas", count=2)  # Kafka, DB
        overlaps = browser.evaluate(OVERLAPS)
        shot = browser.screenshot(ARTIFACTS / "dashboard-lookup-stalled.png")
        # the overview, reached through the navigation's URL, lists the same payment as stalled
        browser.open(f"{dashboard}/overview")
        overview = browser.wait_for_text(
            "Stalled payments", *seeded.stalled, f"{cid} — waiting on trainer.allocated"
        )
        browser.wait_for_selector(".js-plotly-plot .main-svg", count=2)  # funnel, histogram
        browser.screenshot(ARTIFACTS / "dashboard-overview.png")
        # the Payments page, its filters in a shareable URL
        browser.open(f"{dashboard}/payments?state=stalled%2Cfailed&window=1h&refresh=off")
        payments = browser.wait_for_text("Payments (3)", "Pipeline map", "Download CSV")
        browser.wait_for_selector("[data-testid='stGraphVizChart'] svg")  # the pipeline map
        browser.wait_for_selector("[data-testid='stDataFrame'] canvas")
        graph = browser.evaluate(
            "document.querySelector(\"[data-testid='stGraphVizChart'] svg\").textContent"
        )
        browser.screenshot(ARTIFACTS / "dashboard-payments.png")
    marked = [line for line in text.splitlines() if "⟵ ⛔ STOPPED HERE" in line]
    assert any("trainer.allocated" in line for line in marked), marked
    assert "payment.confirmed" in text and "session.created" in text
    assert shot.stat().st_size > 10_000
    assert f"{cid} — waiting on trainer.allocated" in overview
    assert overlaps["ticks"] >= 3 and overlaps["overlapping"] == [], overlaps
    assert "not_reached" not in text and "not reached yet" in text
    assert "state: stalled" in text
    assert "trainer.allocated" in graph and f"{len(seeded.stalled)} stalled" in graph
    assert "p95" in graph
    assert "Where (step)" in payments and "Download CSV" in payments


#: The timeline's axis labels and its stop-marker labels as boxes; the pairs that intersect.
OVERLAPS = """
(() => {
  const plot = document.querySelector('.js-plotly-plot');
  const boxes = [...plot.querySelectorAll('.xtick text, .ytick text, .annotation-text')]
    .map(e => [e.textContent, e.getBoundingClientRect()])
    .filter(([t, r]) => t && r.width > 0);
  const overlapping = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, r] = boxes[i], [b, q] = boxes[j];
    if (r.left < q.right && q.left < r.right && r.top < q.bottom && q.top < r.bottom)
      overlapping.push([a, b]);
  }
  return {ticks: plot.querySelectorAll('.xtick text').length, overlapping};
})()
"""
