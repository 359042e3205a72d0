"""The pipeline map: the spec's steps and topics as a Graphviz graph (DOT, drawn by
``st.graphviz_chart``). A step is a box, a topic an ellipse; the edge from a topic into the step
that consumes it (or into a first step) is coloured by how many payments are stalled waiting on
that step now and labelled with the step's p95 latency (from the previous step's completion)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hoptrace.dashboard.frames import human_duration

#: (at least this many stalled, edge colour, pen width): the first that applies, from the top.
STALL_COLOURS: tuple[tuple[int, str, float], ...] = (
    (10, "#d62728", 3.0),
    (1, "#ff7f0e", 2.2),
    (0, "#2ca02c", 1.4),
)
EMIT_COLOUR = "#9e9e9e"


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def edge_style(stalled: int) -> tuple[str, float]:
    for least, colour, width in STALL_COLOURS:
        if stalled >= least:
            return colour, width
    return STALL_COLOURS[-1][1], STALL_COLOURS[-1][2]


def edge_label(p95: float | None, stalled: int) -> str:
    p95_text = f"p95 {human_duration(p95)}" if p95 is not None else "p95 —"
    return f"{p95_text}\\n{stalled} stalled"


def dot(
    pipeline: Mapping[str, Any],
    stalled: Mapping[str, int],
    p95: Mapping[str, float | None],
) -> str:
    """The DOT source of the map of ``pipeline`` (the API's ``/pipeline``), with ``stalled``
    (step -> stalled payments waiting on it) and ``p95`` (step -> seconds, or None)."""
    steps = list(pipeline.get("steps") or [])
    lines = [
        "digraph pipeline {",
        "  rankdir=TB; bgcolor=transparent; nodesep=0.3; ranksep=0.25;",
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=10];',
        '  start [shape=point, width=0.12, label=""];',
    ]
    topics: list[str] = []
    for s in steps:
        for topic in (s.get("consumes"), s.get("emits")):
            if topic and topic not in topics:
                topics.append(topic)
    for s in steps:
        n = int(stalled.get(s["id"], 0))
        fill = edge_style(n)[0] if n else "#f5f5f5"
        font = "white" if n else "black"
        label = f"{s['id']}\n{s['service']}"
        lines.append(
            f'  {_q("step:" + s["id"])} [shape=box, style="rounded,filled", '
            f'fillcolor="{fill}", fontcolor="{font}", label={_q(label)}];'
        )
    for topic in topics:
        lines.append(
            f"  {_q('topic:' + topic)} [shape=ellipse, style=dashed, fontsize=10, "
            f"label={_q(topic)}];"
        )
    for s in steps:
        sid = s["id"]
        n = int(stalled.get(sid, 0))
        colour, width = edge_style(n)
        style = f'color="{colour}", fontcolor="{colour}", penwidth={width}'
        label = edge_label(p95.get(sid), n)
        if s.get("consumes"):
            source = _q("topic:" + s["consumes"])
        elif s.get("after"):
            source = _q("step:" + s["after"][0])
        else:
            source = "start"
        lines.append(f'  {source} -> {_q("step:" + sid)} [{style}, label="{label}"];')
        if s.get("emits"):
            lines.append(
                f"  {_q('step:' + sid)} -> {_q('topic:' + s['emits'])} "
                f'[color="{EMIT_COLOUR}", arrowsize=0.7];'
            )
    lines.append("}")
    return "\n".join(lines)
