"""Pure conversions: API records -> frames and words; the serve command line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hoptrace.collector.api import HopLatency, StallRow
from hoptrace.dashboard import frames
from hoptrace.dashboard.serve import command
from hoptrace.dashboard.words import CAUSES, cause_words


def test_human_duration() -> None:
    assert frames.human_duration(0.25) == "250 ms"
    assert frames.human_duration(93.5) == "1m 33s"
    assert frames.human_duration(3 * 3600 + 120) == "3h 02m"
    assert frames.human_duration(None) == "—"


def test_latency_frames_from_hop_latency_samples() -> None:
    lat = {
        "purchase.created": HopLatency("purchase.created", [float(i) for i in range(1, 101)]),
        "trainer.allocated": HopLatency("trainer.allocated", []),
    }
    stats, samples = frames.latency_frames(lat)
    assert list(stats["hop"]) == ["purchase.created"]  # a hop with no samples has no row
    row = stats.iloc[0]
    assert row["count"] == 100 and row["p50_s"] == 50.5 and 99 <= row["p99_s"] <= 100
    assert len(samples) == 100


def test_stalled_frame_links_and_overdue() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    row = StallRow(
        "pay/1",
        "payments",
        "trainer.allocated",
        "purchase.created",
        now,
        now,
        timedelta(seconds=75),
    )
    frame = frames.stalled_frame([row], now, base="http://dash")
    assert frame.iloc[0]["lookup"] == "http://dash/?id=pay%2F1"
    assert frame.iloc[0]["overdue_by"] == "1m 15s"


def test_the_timeline_lanes_a_span_by_the_step_the_diagnosis_matched_it_to() -> None:
    """A consumer span of a service hoptrace did not write names no step itself: its lane is
    the step the diagnosis matched it to; the other spans keep theirs."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    spans = [
        {"trace_id": "t", "span_id": "1", "name": "process orders", "service": "node-worker",
         "start_time": t0, "end_time": t0 + timedelta(seconds=1)},
        {"trace_id": "t", "span_id": "2", "name": "pg.query:INSERT", "service": "node-worker",
         "start_time": t0, "end_time": t0 + timedelta(seconds=1)},
        {"trace_id": "t", "span_id": "3", "name": "stock.reserved", "service": "py-worker",
         "step": "stock.reserved", "start_time": t0, "end_time": t0 + timedelta(seconds=1)},
    ]  # fmt: skip
    frame = frames.spans_frame(spans, {("t", "1"): "order.received"})
    assert list(frame["lane"]) == [
        "order.received",
        "node-worker: pg.query:INSERT",
        "stock.reserved",
    ]


def test_state_counts_keep_all_states_in_order() -> None:
    frame = frames.state_counts_frame({"stalled": 2, "completed": 5})
    assert list(frame["state"]) == ["completed", "in_progress", "stalled", "failed"]
    assert list(frame["count"]) == [5, 0, 2, 0]


def test_every_design_cause_code_has_plain_words() -> None:
    from hoptrace.collector.api import CAUSES as API_CAUSES

    assert set(API_CAUSES) <= set(CAUSES)
    assert cause_words("something_new") == "Cause: something_new."


def test_serve_command_is_headless_local_and_without_usage_stats() -> None:
    cmd = command("127.0.0.1", 8765)
    joined = " ".join(cmd)
    assert "streamlit run" in joined and cmd[4].endswith("dashboard/app.py")
    assert "--server.address 127.0.0.1" in joined and "--server.port 8765" in joined
    assert "--server.headless true" in joined and "--browser.gatherUsageStats false" in joined
