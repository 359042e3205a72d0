"""Overview page: counts by state, funnel, per-hop latencies, the stalled list; auto-refresh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import streamlit as st

from hoptrace.dashboard import charts, frames
from hoptrace.dashboard.source import Source, get_source, overview_of

WINDOWS: dict[str, timedelta] = {
    "15 minutes": timedelta(minutes=15),
    "1 hour": timedelta(hours=1),
    "6 hours": timedelta(hours=6),
    "24 hours": timedelta(hours=24),
    "7 days": timedelta(days=7),
}
REFRESH: dict[str, int | None] = {"off": None, "5 s": 5, "15 s": 15, "1 min": 60}
STALLED_LIMIT = 200


def render(source: Source | None = None) -> None:
    source = source or get_source()
    st.title("Overview")
    left, right = st.columns(2)
    window = left.selectbox("Time window", list(WINDOWS), index=1, key="overview_window")
    refresh = right.selectbox("Auto-refresh", list(REFRESH), index=2, key="overview_refresh")
    every = REFRESH[refresh]

    @st.fragment(run_every=every)
    def body() -> None:
        try:
            _body(source, WINDOWS[window])
        except Exception as exc:  # the store is down or slow: say so, keep the page up
            st.error(f"Could not read the trace store: {exc}")

    body()


def _body(source: Source, window: timedelta) -> None:
    now = datetime.now(UTC)
    since = now - window
    data = overview_of(source, since, STALLED_LIMIT)
    counts = frames.state_counts_frame(data.state_counts)
    cols = st.columns(len(counts))
    for col, row in zip(cols, counts.itertuples(), strict=True):
        col.metric(row.state.replace("_", " "), int(row.count))
    st.caption(f"Payments first seen since {since:%Y-%m-%d %H:%M:%S} UTC · updated {now:%H:%M:%S}")

    st.markdown("#### Funnel: payments that got each step done")
    funnel = frames.funnel_frame(data.funnel, source.step_order())
    if funnel.empty:
        st.caption("No payments in this window.")
    else:
        left, right = st.columns([3, 1])
        with left:
            st.plotly_chart(charts.funnel(funnel), key="funnel", config={"displayModeBar": False})
        with right:
            last = frames.last_step_frame(funnel, int(counts["count"].sum()))
            st.dataframe(last, hide_index=True, key="last_step_table")

    st.markdown("#### Per-hop latency")
    stats, samples = frames.latency_frames(data.hop_latencies)
    if stats.empty:
        st.caption("No completed hops in this window.")
    else:
        shown = stats.copy()
        for col in ("p50_s", "p95_s", "p99_s"):
            shown[col.removesuffix("_s")] = shown.pop(col).map(frames.human_duration)
        st.dataframe(shown, hide_index=True, key="latency_table")
        if not samples.empty:
            st.plotly_chart(
                charts.latency_histogram(samples),
                key="latency_hist",
                config={"displayModeBar": False},
            )

    st.markdown("#### Stalled payments")
    stalled = frames.stalled_frame(data.stalled, now)
    if stalled.empty:
        st.success("No stalled payments.")
        return
    st.caption(
        f"{len(stalled)} stalled"
        + (f" (first {STALLED_LIMIT})" if len(stalled) >= STALLED_LIMIT else "")
    )
    lines = [
        f"- [{row.correlation_id}]({row.lookup}) — waiting on **{row.step}**, overdue by {row.overdue_by}"
        for row in stalled.itertuples()
    ]
    st.markdown("\n".join(lines))
