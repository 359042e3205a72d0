"""Plotly figures for the pages: the span Gantt with the stop marker, the funnel, latencies."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

STOP_COLOR = "#d62728"


def gantt(
    spans: pd.DataFrame,
    lane_order: list[str],
    stopped_at: str | None = None,
    stop_time: datetime | None = None,
) -> go.Figure:
    """Spans as bars, one lane per step (then other span names), coloured by service.

    The stop marker is a red lane highlight on ``stopped_at`` plus a vertical line at
    ``stop_time`` (when the last thing happened)."""
    lanes = [lane for lane in lane_order if lane] + [
        lane for lane in spans["lane"].unique().tolist() if lane not in lane_order
    ]
    if stopped_at and stopped_at not in lanes:
        lanes.append(stopped_at)
    fig = px.timeline(
        spans,
        x_start="start",
        x_end="end",
        y="lane",
        color="service",
        hover_data={"name": True, "trace_id": True, "duration_ms": ":.1f", "outcome": True},
        category_orders={"lane": lanes},
    )
    fig.update_yaxes(title=None, categoryorder="array", categoryarray=lanes, autorange="reversed")
    fig.update_xaxes(title=None)
    if stopped_at:
        # A band across the stopped step's lane, labelled, so the marker reads without hovering.
        idx = lanes.index(stopped_at)
        fig.add_hrect(
            y0=idx - 0.5,
            y1=idx + 0.5,
            fillcolor=STOP_COLOR,
            opacity=0.15,
            line_width=0,
            annotation_text="⛔ stopped here",
            annotation_position="top left",
            annotation_font_color=STOP_COLOR,
        )
        if stop_time is not None:
            fig.add_vline(x=stop_time, line_color=STOP_COLOR, line_dash="dash")
    fig.update_layout(
        height=120 + 40 * len(lanes), margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend_title=None
    )
    return fig


def funnel(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Funnel(y=frame["step"], x=frame["count"], textinfo="value+percent initial"))
    fig.update_layout(
        height=80 + 50 * max(1, len(frame)), margin={"l": 10, "r": 10, "t": 10, "b": 10}
    )
    return fig


def latency_histogram(samples: pd.DataFrame) -> go.Figure:
    fig = px.histogram(samples, x="seconds", color="hop", nbins=50, barmode="overlay", opacity=0.7)
    fig.update_layout(
        height=320, margin={"l": 10, "r": 10, "t": 10, "b": 10}, xaxis_title="seconds per hop"
    )
    return fig
