"""Each page against a real store (per-test database) read through the read-only role."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from hoptrace.dashboard.frames import STOP_MARKER
from hoptrace.dashboard.serve import APP

from .apptest import show, text
from .seed import Seeded

pytestmark = pytest.mark.stack


def app(page: str | None = None, **query: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    return show(at, page, query)


def test_overview_shows_the_store_counts_and_stalled_payments(seeded: Seeded) -> None:
    at = app("overview")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {
        "completed": str(len(seeded.completed)),
        "in progress": str(len(seeded.in_progress)),
        "stalled": str(len(seeded.stalled)),
        "failed": str(len(seeded.failed)),
    }
    body = text(at)
    for cid in seeded.stalled:
        assert f"[{cid}](/?id={cid})" in body
    assert "waiting on **trainer.allocated**" in body
    last, latency = (d.value for d in at.dataframe)
    assert latency.loc[latency["hop"] == "session.created", "count"].item() == len(seeded.completed)
    by_last = dict(zip(last["last completed step"], last["payments"], strict=True))
    assert by_last == {
        "(none)": 0,
        "payment.confirmed": len(seeded.in_progress),
        "purchase.created": len(seeded.stalled) + len(seeded.failed),
        "trainer.allocated": 0,
        "session.created": len(seeded.completed),
    }


def test_alerts_page_lists_the_firing_stall_alerts(seeded: Seeded) -> None:
    at = app("alerts")
    assert not at.exception, at.exception
    body = text(at)
    # a dead-lettered (failed) payment alerts too
    assert f"Firing ({len(seeded.stalled) + len(seeded.failed)})" in body
    assert f"Resolved ({len(seeded.recovered)})" in body
    for cid in seeded.stalled + seeded.recovered:
        assert f"**{cid}** at **trainer.allocated**" in body
        assert f"[lookup](/?id={cid})" in body
    # the collector's stall scan asked the diagnosis for the cause: nobody consumes the topic
    assert body.count("`no_consumer` — Nobody is consuming the topic") == len(seeded.stalled) + 1
    firing, resolved = body.split("Resolved (")
    assert seeded.recovered[0] in resolved and seeded.recovered[0] not in firing


def test_lookup_of_a_stalled_payment_marks_trainer_allocated(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hoptrace.settings import get_settings

    # links to Jaeger only when one is configured (unset: trace ids, no link)
    monkeypatch.setenv("HOPTRACE_JAEGER_URL", "http://127.0.0.1:16686")
    get_settings.cache_clear()
    cid = seeded.stalled[0]
    at = app(id=cid)
    assert not at.exception, at.exception
    steps = next(m.value for m in at.markdown if "payment.confirmed" in m.value)
    marked = [line for line in steps.splitlines() if STOP_MARKER in line]
    assert len(marked) == 1 and "**trainer.allocated**" in marked[0], steps
    assert "✅ done — **purchase.created**" in steps
    body = text(at)
    # no worker runs in this test: the allocation group does not exist
    assert "**Cause:** `no_consumer` — Nobody is consuming the topic" in body
    assert "**What to do next:** start allocation-worker" in body
    assert "http://127.0.0.1:16686/trace/" in body
    kafka, db = (d.value for d in at.dataframe)
    row = kafka[kafka["step"] == "trainer.allocated"].iloc[0]
    assert row["topic exists"] == "yes" and row["produced offset"] != "—"
    assert "processed_events" in set(db["what"])
    assert len(at.get("plotly_chart")) == 1  # the Gantt


def test_lookup_of_a_completed_payment_has_no_stop_marker(seeded: Seeded) -> None:
    at = app(id=seeded.completed[0])
    assert not at.exception, at.exception
    assert STOP_MARKER not in text(at)
    assert "Completed" in at.success[0].value


def test_lookup_of_malformed_and_unknown_ids(seeded: Seeded) -> None:
    at = app(id="not an id; DROP TABLE spans")
    assert not at.exception
    assert "is not a valid correlation id" in at.error[0].value
    at = app(id="pay-never-seen")
    assert not at.exception
    assert "No payment with id 'pay-never-seen'" in at.error[0].value
