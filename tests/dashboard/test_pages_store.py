"""Each page against a real store (per-test database) read through the read-only role."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from hoptrace.dashboard.serve import APP

from .seed import Seeded

pytestmark = pytest.mark.stack


def app(page: str | None = None, **query: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = v
    if page:
        at.switch_page(f"pages/{page}.py")
    return at.run()


def text(at: AppTest) -> str:
    parts = (
        [m.value for m in at.markdown] + [e.value for e in at.error] + [e.value for e in at.info]
    )
    parts += [e.value for e in at.success] + [e.value for e in at.warning]
    return "\n".join(str(p) for p in parts)


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
    latency = at.dataframe[0].value
    assert latency.loc[latency["hop"] == "session.created", "count"].item() == len(seeded.completed)


def test_alerts_page_lists_the_firing_stall_alerts(seeded: Seeded) -> None:
    at = app("alerts")
    assert not at.exception, at.exception
    body = text(at)
    assert f"Firing ({len(seeded.stalled)})" in body
    for cid in seeded.stalled:
        assert f"**{cid}** at **trainer.allocated**" in body
