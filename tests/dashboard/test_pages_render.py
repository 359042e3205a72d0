"""Page rendering with small fixture objects in the API's shapes (no servers needed)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from hoptrace.dashboard.frames import STOP_MARKER
from hoptrace.dashboard.serve import APP
from hoptrace.dashboard.source import SOURCE_KEY

from .apptest import show, text
from .fakes import FakeSource


def app(page: str | None = None, **query: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state[SOURCE_KEY] = FakeSource()
    return show(at, page, query)


def test_lookup_by_query_param_marks_the_stopped_step() -> None:
    at = app(id="pay-stalled-1")
    assert not at.exception
    steps = next(m.value for m in at.markdown if "payment.confirmed" in m.value)
    marked = [line for line in steps.splitlines() if STOP_MARKER in line]
    assert len(marked) == 1 and "trainer.allocated" in marked[0]
    body = text(at)
    assert "no_consumer" in body and "no running members" in body
    assert "start allocation-worker" in body
    assert "http://jaeger.test/trace/" in body
    assert len(at.dataframe) == 2  # Kafka facts, DB facts


def test_lookup_marks_every_branch_that_stopped_and_shows_span_text_as_text() -> None:
    at = app(id="pay-fanout-1")
    assert not at.exception
    steps = next(m.value for m in at.markdown if "payment.confirmed" in m.value)
    marked = [line for line in steps.splitlines() if STOP_MARKER in line]
    assert [("trainer.allocated" in m, "session.created" in m) for m in marked] == [
        (True, False),
        (False, True),
    ]
    assert "Other branches stopped at **session.created**" in at.warning[0].value
    assert "branch stopped here\\: in\\_progress" in steps  # its cause, in its evidence
    assert "\\[click\\]\\(http\\://evil\\.test\\) \\*\\*x\\*\\*" in steps  # text, not a link


def test_lookup_by_text_input() -> None:
    at = app()
    assert "Paste a payment id" in text(at)
    at.text_input(key="lookup_id").input("pay-stalled-1")
    at.button[0].click().run()
    assert not at.exception
    assert "trainer.allocated" in at.error[0].value
    assert at.query_params["id"] in ("pay-stalled-1", ["pay-stalled-1"])


def test_lookup_malformed_and_unknown_ids_get_clear_messages() -> None:
    at = app(id="DROP TABLE")
    assert not at.exception
    assert "not a payment id" in at.error[0].value
    at = app(id="pay-unknown")
    assert "No payment with id 'pay-unknown'" in at.error[0].value


def test_overview_counts_funnel_latency_and_stalled_links() -> None:
    at = app("overview")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"completed": "7", "in progress": "2", "stalled": "3", "failed": "0"}
    body = text(at)
    assert "[pay-s0](/?id=pay-s0)" in body and "overdue by 1m 30s" in body
    last, latency = (d.value for d in at.dataframe)
    assert list(latency["hop"]) == ["purchase.created", "trainer.allocated"]
    assert latency.loc[latency["hop"] == "trainer.allocated", "count"].item() == 2


def test_alerts_page_splits_firing_and_resolved() -> None:
    at = app("alerts")
    assert not at.exception
    body = text(at)
    assert "Firing (1)" in body and "Resolved (1)" in body
    assert "pay-s0" in body and "no_consumer" in body and "[lookup](/?id=pay-s0)" in body


def test_payments_page_lists_in_people_s_words_with_links_and_a_map() -> None:
    at = app("payments", state="stalled", window="6h", refresh="off")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    source = at.session_state[SOURCE_KEY]
    assert source.payment_params[-1] == {"state": "stalled", "since": "6h", "limit": "50"}
    [table] = [d.value for d in at.dataframe]
    row = table.iloc[0]
    assert (row["payment"], row["state"], row["where"], row["cause"]) == (
        "pay-s0", "stalled", "trainer.allocated", "no consumer"
    )  # fmt: skip
    assert row["lookup"] == "/?id=pay-s0"
    assert row["traces"].startswith("http://jaeger.test/search?service=payment-service&tags=")
    assert "%22hoptrace.correlation_id%22%3A%22pay-s0%22" in row["traces"]
    [chart] = at.get("graphviz_chart")
    assert "3 stalled" in chart.proto.spec and "#ff7f0e" in chart.proto.spec
    # the choices stay in the URL (a shareable link)
    assert at.query_params["state"] in ("stalled", ["stalled"])
    assert at.query_params["window"] in ("6h", ["6h"])


def test_payments_page_people_s_words_for_nothing_and_completed() -> None:
    at = app("payments")
    assert not at.exception, at.exception
    [table] = [d.value for d in at.dataframe]
    done = table[table["payment"] == "pay-d0"].iloc[0]
    assert (done["state"], done["where"], done["cause"]) == ("completed", "—", "—")
    assert "None" not in table.astype(str).to_string()
    assert "not_reached" not in text(at)


def test_payments_page_next_page_keeps_the_cursor_in_the_url() -> None:
    at = app("payments")
    at.button(key="payments_next").click().run()
    assert not at.exception, at.exception
    assert at.query_params["cursor"] in ("c1", ["c1"])
    source = at.session_state[SOURCE_KEY]
    assert source.payment_params[-1]["cursor"] == "c1"


def test_payments_page_a_changed_filter_reads_again_and_lands_in_the_url() -> None:
    at = app("payments")
    at.multiselect(key="pay_state").select("failed").run()
    assert not at.exception, at.exception
    source = at.session_state[SOURCE_KEY]
    assert source.payment_params[-1]["state"] == "failed"
    assert at.query_params["state"] in ("failed", ["failed"])
    assert at.query_params["window"] in ("1h", ["1h"])  # the defaults are in the link too


def test_lookup_shows_statuses_in_people_s_words() -> None:
    at = app(id="pay-stalled-1")
    steps = next(m.value for m in at.markdown if "payment.confirmed" in m.value)
    assert "not reached yet — **session.created**" in steps
    assert "not_reached" not in steps and "None" not in steps
    assert "state: stalled" in at.caption[0].value
