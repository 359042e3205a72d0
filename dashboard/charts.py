"""Plotly figures for the pages: the span Gantt with the stop marker, the funnel, latencies."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from hoptrace.dashboard.words import ITEMS

STOP_COLOR = "#d62728"
REDRIVE_COLOR = "#1f77b4"


def gantt(
    spans: pd.DataFrame,
    lane_order: list[str],
    stopped_at: str | None = None,
    stop_time: datetime | None = None,
    branches: list[str] | None = None,
    marks: list[tuple[datetime, str]] | None = None,
) -> go.Figure:
    """Spans as bars, one lane per step (then other span names), coloured by service.

    ``marks``: (when, label) of each redrive, drawn as a dotted vertical line.

    The stop marker is a red lane highlight on ``stopped_at`` (and on each other step where a
    branch stopped, ``branches``) plus a vertical line at ``stop_time`` (when the last thing
    happened)."""
    lanes = [lane for lane in lane_order if lane] + [
        lane for lane in spans["lane"].unique().tolist() if lane not in lane_order
    ]
    marked = [s for s in [stopped_at, *(branches or [])] if s]
    lanes += [s for s in dict.fromkeys(marked) if s not in lanes]
    fig = go.Figure()
    for service, group in spans.groupby("service", sort=False):
        fig.add_trace(
            go.Bar(
                orientation="h",
                y=group["lane"],
                base=group["start"],
                x=(group["end"] - group["start"]).dt.total_seconds() * 1000,  # ms on a date axis
                name=str(service),
                customdata=group[["name", "trace_id", "outcome", "duration_ms"]].to_numpy(),
                hovertemplate="%{customdata[0]} · %{customdata[2]}<br>trace %{customdata[1]}"
                "<br>%{customdata[3]:.1f} ms<extra>%{fullData.name}</extra>",
            )
        )
    # a date axis at millisecond grain: few, one-line labels (time of day to the millisecond;
    # the day is in the axis title), so they never run into each other
    # (the day comes from the first span, else from the first mark: a payment with no spans yet)
    known = [*pd.to_datetime(spans["start"], utc=True).dropna(), *(at for at, _ in marks or ())]
    day = f"{min(pd.Timestamp(t) for t in known):%Y-%m-%d} (UTC)" if known else "UTC"
    fig.update_xaxes(
        type="date",
        tickformat="%H:%M:%S.%L",
        nticks=6,
        tickangle=0,
        automargin=True,
        title={"text": day, "font": {"size": 11}},
    )
    fig.update_yaxes(
        title=None,
        categoryorder="array",
        categoryarray=lanes,
        autorange="reversed",
        automargin=True,
    )
    for lane in dict.fromkeys(marked):
        # A band across a stopped step's lane, labelled at its left end inside the plot (never
        # on the axis labels; the lane has no bar of its own), so the marker reads without hovering.
        idx = lanes.index(lane)
        fig.add_hrect(y0=idx - 0.5, y1=idx + 0.5, fillcolor=STOP_COLOR, opacity=0.15, line_width=0)
        fig.add_annotation(
            text="⛔ stopped here",
            xref="paper",
            x=0.01,
            xanchor="left",
            yref="y",
            y=lane,
            yanchor="middle",
            showarrow=False,
            font={"color": STOP_COLOR},
        )
    if stopped_at and stop_time is not None:
        fig.add_vline(x=stop_time, line_color=STOP_COLOR, line_dash="dash")
    for at, label in marks or ():  # redrives: a dotted line with its label
        fig.add_vline(x=at, line_color=REDRIVE_COLOR, line_dash="dot")
        fig.add_annotation(
            x=at, y=1, yref="paper", text=label, showarrow=False, font_color=REDRIVE_COLOR
        )
    fig.update_layout(
        height=140 + 40 * len(lanes),
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        legend={"title": None, "orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
    )
    return fig


def funnel(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Funnel(y=frame["step"], x=frame["count"], textinfo="value+percent initial"))
    fig.update_layout(
        height=80 + 50 * max(1, len(frame)), margin={"l": 10, "r": 10, "t": 10, "b": 10}
    )
    return fig


def latency_histogram(samples: pd.DataFrame, bins: int = 40) -> go.Figure:
    """Per-hop latency histograms on shared bins (binned here: the browser gets ``bins`` bars
    per hop, not every sample)."""
    values = samples["seconds"].to_numpy(dtype=float)
    hi = float(np.percentile(values, 99.5)) if values.size else 1.0
    edges = np.linspace(0.0, max(hi, 1e-3), bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for hop, group in samples.groupby("hop", sort=False):
        counts, _ = np.histogram(
            np.clip(group["seconds"].to_numpy(dtype=float), 0, edges[-1]), edges
        )
        fig.add_trace(go.Bar(x=centers, y=counts, name=str(hop), opacity=0.7))
    fig.update_layout(
        barmode="overlay",
        bargap=0,
        height=320,
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        xaxis_title="seconds per hop",
        yaxis_title=ITEMS,
    )
    return fig
