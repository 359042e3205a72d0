"""Lookup page: one payment's steps, the stop markers (one per unfinished branch), the timeline,
the cause and the evidence. Text that comes from the user or from spans (the typed id, error
messages, evidence lines, next actions) is shown as text (``plain.literal``), never as Markdown.

With ``HOPTRACE_REDRIVE_URL`` (the collector's HTTP base) and ``HOPTRACE_REDRIVE_TOKEN`` set, a
"redrive" button asks the collector's ``POST /redrive`` for the dry run, shows it, and applies on
confirmation; the dashboard itself never writes (without both settings there is no button)."""

from __future__ import annotations

from typing import Any

import httpx
import streamlit as st

from hoptrace.contract import Cause
from hoptrace.dashboard import charts, frames
from hoptrace.dashboard.frames import STOP_MARKER, first, get
from hoptrace.dashboard.plain import literal
from hoptrace.dashboard.source import LookupError_, Source, get_source
from hoptrace.dashboard.words import cause_words, state_words
from hoptrace.settings import RedriveSettings

#: Spans drawn in the timeline at most (the evidence lines still count every span).
GANTT_MAX_SPANS = 500


def render(source: Source | None = None) -> None:
    source = source or get_source()
    st.title("Lookup")
    current = st.query_params.get("id", "")
    with st.form("lookup"):
        typed = st.text_input("Payment (correlation) id", value=current, key="lookup_id")
        submitted = st.form_submit_button("Look up")
    cid = (typed if submitted else current).strip()
    if submitted and cid != current:
        st.query_params["id"] = cid
    if not cid:
        st.info("Paste a payment id, or open a link such as `?id=<payment id>`.")
        return
    try:
        diagnosis = source.diagnose(cid)
    except LookupError_ as exc:  # its message quotes the raw id
        st.error(literal(exc))
        return
    except Exception as exc:  # the store or Kafka is down: say so, keep the page up
        st.error(f"Could not diagnose {literal(cid)}: {literal(exc)}")
        return
    show(diagnosis, source)


def show(diagnosis: Any, source: Source) -> None:
    """Everything about one diagnosed correlation."""
    cid = str(first(diagnosis, "correlation_id", "id"))
    stopped_at = get(diagnosis, "stopped_at")
    branches = [h for h in get(diagnosis, "stopped_at_all", None) or () if h != stopped_at]
    cause = get(diagnosis, "cause")
    state = get(diagnosis, "state", "")
    st.subheader(f"Payment `{cid}`")
    if not stopped_at:
        st.success(f"Completed — every step is done (cause `{cause}`).")
    elif cause == Cause.IN_PROGRESS:
        st.warning(f"{STOP_MARKER}: waiting at step **{stopped_at}** (still within its deadline).")
    else:
        st.error(f"{STOP_MARKER}: step **{stopped_at}** — cause `{cause}`")
    if branches:
        where = ", ".join(f"**{h}**" for h in branches)
        st.warning(f"Other branches stopped at {where} (their causes are in their steps).")
    st.caption(f"state: {state_words(state)}" if state else "")

    steps = frames.steps_frame(diagnosis)
    st.markdown("#### Steps")
    lines = []
    for row in steps.itertuples():
        marker = f"  ⟵ **{STOP_MARKER}**" if row.marker else ""
        lines.append(f"1. {row.status} — **{row.step}** ({row.service or '—'}, {row.took}){marker}")
        lines.extend(f"    - {literal(line)}" for line in row.evidence)
    st.markdown("\n".join(lines))

    st.markdown("#### Why")
    st.markdown(f"**Cause:** `{cause}` — {cause_words(cause)}")
    summary = get(diagnosis, "summary")
    if summary:
        st.markdown(literal(summary))
    evidence = get(diagnosis, "evidence", []) or []
    if evidence:
        st.markdown("\n".join(f"- {literal(line)}" for line in evidence))
    next_action = first(diagnosis, "next_action", "next_step_hint")
    if next_action:
        st.markdown(f"**What to do next:** {literal(next_action)}")

    st.markdown("#### Timeline")
    raw = get(diagnosis, "spans")
    raw = list(raw if raw is not None else source.spans(cid))
    if len(raw) > GANTT_MAX_SPANS:  # a payment redelivered in a loop: keep the page light
        st.caption(f"Showing the first {GANTT_MAX_SPANS} of {len(raw)} spans.")
        raw = raw[:GANTT_MAX_SPANS]
    spans = frames.spans_frame(raw, get(diagnosis, "span_steps"))
    if spans.empty:
        st.caption("No spans recorded for this payment.")
    else:
        stop_time = None
        if stopped_at:
            stop_time = spans["end"].max()
        marks = frames.redrive_marks(diagnosis)
        st.plotly_chart(
            charts.gantt(spans, steps["step"].tolist(), stopped_at, stop_time, branches, marks),
            key="gantt",
            config={"displayModeBar": False},
        )

    redrive_panel(cid)

    kafka = get(diagnosis, "kafka_facts")
    db = get(diagnosis, "db_facts")
    st.markdown("#### Kafka")
    _facts(kafka, "No Kafka facts.")
    st.markdown("#### Database")
    _facts(db, "No database facts.")

    st.markdown("#### Traces in Jaeger")
    urls = get(diagnosis, "jaeger_urls") or [
        u
        for u in (
            frames.jaeger_link(source.jaeger_url(), t)
            for t in get(diagnosis, "trace_ids", []) or []
        )
        if u  # none without a Jaeger configured
    ]
    trace_ids = get(diagnosis, "trace_ids", []) or []
    if urls:
        st.markdown("\n".join(f"- [{u.rsplit('/', 1)[-1]}]({u})" for u in urls))
    elif trace_ids:
        st.caption(f"No Jaeger configured (HOPTRACE_JAEGER_URL); traces: {', '.join(trace_ids)}")
    else:
        st.caption("No traces recorded.")


def _facts(facts: Any, empty: str) -> None:
    frame = frames.facts_frame(facts)
    if frame.empty:
        st.caption(empty)
    else:
        st.dataframe(frame.astype(str), hide_index=True)


def _redrive_call(cid: str, apply: bool) -> dict[str, Any]:
    """POST the collector's redrive route with the redrive token; its report (or an error)."""
    cfg = RedriveSettings()
    url = f"{(cfg.redrive_url or '').rstrip('/')}/redrive"
    headers = {"Authorization": f"Bearer {cfg.redrive_token}"}
    body = {"id": cid, "apply": apply, "who": cfg.redrive_who or "dashboard"}
    try:
        res = httpx.post(url, json=body, headers=headers, timeout=60)
        doc = res.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"message": f"redrive service unreachable: {exc}"}
    if res.status_code != 200:
        return {"message": doc.get("message", f"HTTP {res.status_code}")}
    return doc


def redrive_panel(cid: str) -> None:
    """The redrive button: the dry run first, applied on confirmation (only when configured)."""
    if not RedriveSettings().dashboard_can_redrive:
        return
    st.markdown("#### Redrive")
    key = f"redrive_plan:{cid}"
    if st.button("Redrive… (dry run first)", key="redrive_dry"):
        st.session_state[key] = _redrive_call(cid, apply=False)
    plan = st.session_state.get(key)
    if not plan:
        return
    if "message" in plan:
        st.error(literal(plan["message"]))
        return
    acts = [a for p in plan.get("payments", []) for a in p.get("actions", [])]
    st.markdown("\n".join(f"- {literal(a['step'])}: {literal(a['description'])}" for a in acts))
    if not any(a.get("sends") for a in acts):
        st.caption("Nothing to send.")
        return
    if st.button("Confirm: apply the redrive", key="redrive_apply", type="primary"):
        done = _redrive_call(cid, apply=True)
        del st.session_state[key]
        if "message" in done:
            st.error(literal(done["message"]))
            return
        summary = done.get("summary", {})
        lines = [
            f"- {literal(a['step'])}: {literal(a['result'] or a['kind'])} — {literal(a['description'])}"
            for p in done.get("payments", [])
            for a in p.get("actions", [])
        ]
        st.success(f"Redrive applied: {summary.get('sent', 0)} record(s) sent.")
        st.markdown("\n".join(lines))
