"""Alerts page: firing and resolved stall alerts with their cause and links (the evidence, span
data, shown as text)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from hoptrace.dashboard import frames
from hoptrace.dashboard.plain import literal
from hoptrace.dashboard.source import Source, get_source
from hoptrace.dashboard.words import cause_words

ALERTS_LIMIT = 200


def render(source: Source | None = None) -> None:
    source = source or get_source()
    st.title("Alerts")
    try:
        table = frames.alerts_frame(source.alerts(ALERTS_LIMIT))
    except Exception as exc:  # the store is down or slow: say so, keep the page up
        st.error(f"Could not read the trace store: {literal(exc)}")
        return
    jaeger = source.jaeger_url()
    firing = table[table["status"] == "firing"]
    resolved = table[table["status"] != "firing"]
    st.markdown(f"#### Firing ({len(firing)})")
    _list(firing, jaeger, "No alert is firing.")
    st.markdown(f"#### Resolved ({len(resolved)})")
    _list(resolved, jaeger, "No resolved alerts.")


def _list(table: pd.DataFrame, jaeger: str, empty: str) -> None:
    if table.empty:
        st.caption(empty)
        return
    lines = []
    for row in table.itertuples():
        when = f"fired {row.fired_at:%Y-%m-%d %H:%M:%S}" if row.fired_at is not None else ""
        if row.resolved_at is not None and not pd.isna(row.resolved_at):
            when += f", resolved {row.resolved_at:%H:%M:%S}"
        cause = (
            f"`{row.cause}` — {cause_words(row.cause)}" if row.cause else "cause not diagnosed yet"
        )
        links = f"[lookup]({row.lookup})"
        if row.jaeger:
            links += f" · [Jaeger]({row.jaeger})"
        line = f"- **{row.correlation_id}** at **{row.step or '—'}** ({when}): {cause} {links}"
        if row.evidence:
            line += f"\n  - {literal(row.evidence)}"  # span data: shown as text
        lines.append(line)
    st.markdown("\n".join(lines))
