"""Redrives in a lookup's evidence: the collector reads the ``redrives`` rows (none when the table
is missing), ``hoptrace trace`` lists them under their step (text, markdown, JSON evidence), and
the dashboard shows them in the step list and as marks on the timeline."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest

from hoptrace.collector.db_facts import redrive_records
from hoptrace.collector.diagnosis import diagnose
from hoptrace.collector.records import Evidence, RedriveRecord
from hoptrace.collector.render import to_dict, to_markdown, to_text
from hoptrace.contract import load_spec
from hoptrace.dashboard import charts, frames
from hoptrace.repair import audit
from tests.support import REFERENCE_SPEC

SPEC = load_spec(REFERENCE_SPEC)
NOW = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)
R = RedriveRecord(
    3,
    "trainer.allocated",
    "downstream_error",
    "republish_dead_letter",
    "sent",
    "alice",
    NOW,
    "purchase-created.dlq[0]@4",
    "purchase-created[0]@9",
    None,
    "ab" * 16,
)


def diagnosis():
    ev = Evidence("pay-1", effects={"payment.confirmed": True}, processed=(), redrives=(R,))
    return diagnose(SPEC, ev, NOW)


def test_trace_lists_redrives_under_their_step() -> None:
    d = diagnosis()
    text = to_text(d)
    assert R.line() in text
    assert "redrive #3 by alice" in R.line() and "-> purchase-created[0]@9" in R.line()
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if "trainer.allocated" in line)
    assert any("redrive #3" in line for line in lines[at + 1 : at + 8])
    assert "redrive #3" in to_markdown(d)
    step = next(s for s in to_dict(d)["steps"] if s["id"] == "trainer.allocated")
    assert R.line() in step["evidence"]


def test_dashboard_steps_and_timeline_show_redrives() -> None:
    d = diagnosis()
    steps = frames.steps_frame(d)
    row = steps[steps["step"] == "trainer.allocated"].iloc[0]
    assert R.line() in row["evidence"]
    assert frames.redrive_marks(d) == [(NOW, "redrive #3 trainer.allocated: sent")]
    assert frames.redrive_marks({"steps": []}) == []  # no facts: no marks
    spans = frames.spans_frame([])
    fig = charts.gantt(spans, steps["step"].tolist(), marks=frames.redrive_marks(d))
    assert any(a.text == "redrive #3 trainer.allocated: sent" for a in fig.layout.annotations)


@pytest.mark.stack
def test_the_collector_reads_the_redrives_rows(db_url: str) -> None:
    async def scenario() -> tuple[list[RedriveRecord], list[RedriveRecord]]:
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            before = await redrive_records(pool, "pay-1")  # no table yet: none
            await audit.ensure(pool)
            row = await audit.begin(
                pool,
                cid="pay-1",
                step="trainer.allocated",
                cause="downstream_error",
                action="republish_dead_letter",
                result="sending",
                who="alice",
            )
            await audit.finish(pool, row, "sent", sent=("purchase-created", 0, 9))
            return before, await redrive_records(pool, "pay-1")
        finally:
            await pool.close()

    before, after = asyncio.run(scenario())
    assert before == []
    (r,) = after
    assert (r.step, r.result, r.who, r.sent) == (
        "trainer.allocated",
        "sent",
        "alice",
        "purchase-created[0]@9",
    )
