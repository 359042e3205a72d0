"""hoptrace dashboard: `streamlit run` entry point (started by `hoptrace dashboard`)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="hoptrace", page_icon="🛰️", layout="wide")
page = st.navigation(
    [
        st.Page(HERE / "pages" / "lookup.py", title="Lookup", icon="🔎", default=True),
        st.Page(HERE / "pages" / "payments.py", title="Payments", icon="💳"),
        st.Page(HERE / "pages" / "overview.py", title="Overview", icon="📊"),
        st.Page(HERE / "pages" / "alerts.py", title="Alerts", icon="🚨"),
    ]
)
page.run()
