"""Payments page: payments listed newest first with the read API's filters (state, where it is
by step and by service, cause, time window), every choice kept in the URL (a shareable link), a
CSV of the listed rows, each payment's lookup and its traces in Jaeger (a search by the
correlation tag); above the list, the pipeline map (stalled payments and p95 per hop)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import pandas as pd
import streamlit as st

from hoptrace.contract import CAUSES, STATES
from hoptrace.contract.conventions import ATTR_CORRELATION_ID
from hoptrace.dashboard import frames, pipeline_map
from hoptrace.dashboard.plain import literal
from hoptrace.dashboard.source import BadFilter, Source, get_source
from hoptrace.dashboard.words import NOTHING, cause_title, shown, state_words

#: Time windows and refresh periods, by their value in the URL.
WINDOWS: dict[str, tuple[str, timedelta]] = {
    "15m": ("15 minutes", timedelta(minutes=15)),
    "1h": ("1 hour", timedelta(hours=1)),
    "6h": ("6 hours", timedelta(hours=6)),
    "24h": ("24 hours", timedelta(hours=24)),
    "7d": ("7 days", timedelta(days=7)),
}
REFRESH: dict[str, tuple[str, int | None]] = {
    "off": ("off", None),
    "5s": ("5 s", 5),
    "15s": ("15 s", 15),
    "1m": ("1 min", 60),
}
PAGE_SIZES = (50, 100, 500)
#: The URL's filter parameters (comma-separated lists) and the other choices kept there.
FILTERS = ("state", "step", "service", "cause")
ANY = ""


def _listed(value: str | None, allowed: list[str]) -> list[str]:
    return [v for v in (value or "").split(",") if v in allowed]


def jaeger_search(jaeger: str | None, service: str, cid: str, first_seen: datetime) -> str:
    """Jaeger's search for the traces tagged with the correlation id (around ``first_seen``)."""
    if not jaeger:  # no Jaeger configured: no link
        return ""
    start = first_seen - timedelta(minutes=10)
    end = max(first_seen, datetime.now(UTC)) + timedelta(minutes=10)
    params = {
        "service": service,
        "tags": json.dumps({ATTR_CORRELATION_ID: cid}, separators=(",", ":")),
        "lookback": "custom",
        "start": int(start.timestamp() * 1_000_000),
        "end": int(end.timestamp() * 1_000_000),
        "limit": 20,
    }
    return f"{jaeger.rstrip('/')}/search?{urlencode(params, quote_via=quote)}"


def payments_frame(
    items: list[Mapping[str, Any]], jaeger: str | None, root_service: str
) -> pd.DataFrame:
    """The listed payments in people's words, with their lookup and Jaeger links."""
    rows = []
    for r in items:
        cid = r["correlation_id"]
        first_seen = frames.as_datetime(r["first_seen"])
        rows.append(
            {
                "payment": cid,
                "state": state_words(r["state"]),
                "where": shown(r["step"]),
                "service": shown(r["service"]),
                "cause": cause_title(r["cause"]),
                "first seen": first_seen,
                "last step done": shown(r["last_step"]),
                "due by": frames.as_datetime(r["next_deadline"]),
                "last error": shown(r["last_error"]),
                "lookup": frames.lookup_link(cid),
                "traces": jaeger_search(jaeger, root_service, cid, first_seen or datetime.now(UTC)),
            }
        )
    cols = ["payment", "state", "where", "service", "cause", "first seen", "last step done",
            "due by", "last error", "lookup", "traces"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def csv_bytes(items: list[Mapping[str, Any]], frame: pd.DataFrame) -> bytes:
    """The listed rows as the API gives them (codes, ISO times) plus the two links."""
    raw = pd.DataFrame(list(items))
    if not raw.empty:
        raw["lookup"] = frame["lookup"].to_numpy()
        raw["jaeger"] = frame["traces"].to_numpy()
    return raw.to_csv(index=False).encode()


def _choices(pipeline: Mapping[str, Any]) -> dict[str, list[str]]:
    steps = [s["id"] for s in pipeline["steps"]]
    services = list(dict.fromkeys(s["service"] for s in pipeline["steps"]))
    return {"state": list(STATES), "step": steps, "service": services, "cause": list(CAUSES)}


def render(source: Source | None = None) -> None:
    source = source or get_source()
    st.title("Payments")
    qp = st.query_params
    try:
        pipeline = source.pipeline()
    except Exception as exc:  # the API or the store is down: say so, keep the page up
        st.error(f"Could not read the pipeline: {literal(exc)}")
        return
    choices = _choices(pipeline)
    a, b, c, d = st.columns(4)
    picked = {
        "state": a.multiselect(
            "State",
            choices["state"],
            _listed(qp.get("state"), choices["state"]),
            format_func=state_words,
            key="pay_state",
        ),  # fmt: skip
        "step": b.multiselect(
            "Where (step)",
            choices["step"],
            _listed(qp.get("step"), choices["step"]),
            key="pay_step",
        ),  # fmt: skip
        "service": c.multiselect(
            "Where (service)",
            choices["service"],
            _listed(qp.get("service"), choices["service"]),
            key="pay_service",
        ),  # fmt: skip
    }
    causes = [ANY, *choices["cause"]]
    cause_now = qp.get("cause", ANY)
    picked["cause"] = [
        d.selectbox(
            "Cause",
            causes,
            causes.index(cause_now) if cause_now in causes else 0,
            format_func=lambda v: "any" if v == ANY else cause_title(v),
            key="pay_cause",
        )  # fmt: skip
    ]
    e, f, g = st.columns(3)
    window = _pick(e, "Time window (first seen)", WINDOWS, qp.get("window"), "1h", "pay_window")
    refresh = _pick(f, "Auto-refresh", REFRESH, qp.get("refresh"), "off", "pay_refresh")
    size_now = int(qp.get("limit", PAGE_SIZES[0])) if qp.get("limit", "").isdigit() else 0
    limit = g.selectbox("Rows per page", PAGE_SIZES,
                        PAGE_SIZES.index(size_now) if size_now in PAGE_SIZES else 0, key="pay_limit")  # fmt: skip

    wanted = {k: ",".join(v for v in picked[k] if v) for k in FILTERS}
    kept = {k: v for k, v in wanted.items() if v}
    kept.update(window=window, refresh=refresh, limit=str(limit))
    signature = json.dumps(kept, sort_keys=True)
    cursor = qp.get("cursor")
    if st.session_state.get("pay_signature") not in (None, signature):
        cursor = None  # other filters: back to the first page
    st.session_state["pay_signature"] = signature
    _keep_in_url(kept, cursor)

    params = {**kept, "since": window, "limit": str(limit)}
    params.pop("window")
    params.pop("refresh")
    if cursor:
        params["cursor"] = cursor

    @st.fragment(run_every=REFRESH[refresh][1])
    def body() -> None:
        try:
            _body(source, pipeline, params, WINDOWS[window][1])
        except BadFilter as exc:
            st.error(f"Bad filter: {literal(exc)}")
        except Exception as exc:  # the API or the store is down: say so, keep the page up
            st.error(f"Could not read the payments: {literal(exc)}")

    body()


def _pick(
    col: Any,
    label: str,
    options: Mapping[str, tuple[str, Any]],
    now: str | None,
    default: str,
    key: str,
) -> str:
    keys = list(options)
    index = keys.index(now) if now in keys else keys.index(default)
    return str(col.selectbox(label, keys, index, format_func=lambda k: options[k][0], key=key))


def _keep_in_url(kept: Mapping[str, str], cursor: str | None) -> None:
    """The page's choices in the URL (and nothing stale): a link reopens the same view."""
    wanted = dict(kept)
    if cursor:
        wanted["cursor"] = cursor
    for key in [k for k in st.query_params if k not in wanted]:
        del st.query_params[key]
    for key, value in wanted.items():
        if st.query_params.get(key) != value:
            st.query_params[key] = value


def _body(
    source: Source, pipeline: Mapping[str, Any], params: dict[str, str], window: timedelta
) -> None:
    now = datetime.now(UTC)
    since = now - window
    page = source.payments(params)

    stats, _ = frames.latency_frames(source.hop_latencies(since))
    p95 = dict(zip(stats["hop"], stats["p95_s"], strict=True)) if not stats.empty else {}
    stalled = source.stalled_counts()
    graph, listed = st.columns([1, 3])
    with graph:
        st.markdown("#### Pipeline map")
        st.graphviz_chart(pipeline_map.dot(pipeline, stalled, p95), width="content")
        st.caption(
            "Each arrow into a step: its p95 latency over the time window (from the previous "
            "step's completion) and the payments stalled waiting on it now (green none, orange "
            "some, red 10 or more)."
        )
    with listed:
        _list(source, pipeline, params, page, now, since)


def _list(
    source: Source,
    pipeline: Mapping[str, Any],
    params: dict[str, str],
    page: Mapping[str, Any],
    now: datetime,
    since: datetime,
) -> None:
    items = page["items"]
    st.markdown(f"#### Payments ({len(items)}{' or more' if page['next_cursor'] else ''})")
    if not items:
        st.info("No payment matches these filters in this time window.")
    else:
        root = pipeline["steps"][0]["service"] if pipeline.get("steps") else NOTHING
        table = payments_frame(items, source.jaeger_url(), root)
        st.dataframe(
            table,
            hide_index=True,
            key="payments_table",
            placeholder=NOTHING,
            column_config={
                "lookup": st.column_config.LinkColumn("lookup", display_text="open"),
                "traces": st.column_config.LinkColumn("Jaeger", display_text="search traces"),
                "first seen": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
                "due by": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            },
        )
        st.download_button(
            "Download CSV",
            csv_bytes(items, table),
            file_name=f"payments-{now:%Y%m%dT%H%M%SZ}.csv",
            mime="text/csv",
            on_click="ignore",
            key="payments_csv",
        )
    st.caption(
        f"First seen since {since:%Y-%m-%d %H:%M:%S} UTC · updated {now:%H:%M:%S} · where: the "
        "step it waits on or failed at; cause: of its latest alert"
    )
    left, right = st.columns(2)
    if params.get("cursor") and left.button("⏮ First page", key="payments_first"):
        del st.query_params["cursor"]
        st.rerun()
    if page["next_cursor"] and right.button("Next page ⏭", key="payments_next"):
        st.query_params["cursor"] = page["next_cursor"]
        st.rerun()


__all__ = ["csv_bytes", "jaeger_search", "payments_frame", "render"]
