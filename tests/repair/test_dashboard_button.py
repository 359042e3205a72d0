"""The lookup page's redrive button: absent by default (the dashboard stays read-only); with
``HOPTRACE_REDRIVE_URL`` and ``HOPTRACE_REDRIVE_TOKEN`` it asks the redrive route for the dry run
first (with the token), shows it, and applies only on confirmation. The route is a small canned
HTTP server here (the route itself is tested end to end in ``test_e2e_redrive``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from streamlit.testing.v1 import AppTest

from hoptrace.dashboard.serve import APP
from hoptrace.dashboard.source import SOURCE_KEY
from tests.dashboard.apptest import show, text
from tests.dashboard.fakes import FakeSource


def report(applied: bool) -> dict:
    action = {
        "step": "trainer.allocated",
        "kind": "republish_dead_letter",
        "sends": True,
        "description": "send purchase-created.dlq[0]@3 to purchase-created (the dead-lettered record)",
        "result": "sent" if applied else None,
    }
    return {
        "applied": applied,
        "summary": {"sent": 1 if applied else 0},
        "payments": [{"actions": [action]}],
    }


@pytest.fixture
def route() -> Iterator[tuple[str, list[dict]]]:
    calls: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            out = json.dumps(report(bool(body.get("apply")))).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", calls
    server.shutdown()


def app(**query: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state[SOURCE_KEY] = FakeSource()
    return show(at, None, query)


def test_no_button_without_a_redrive_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOPTRACE_REDRIVE_URL", raising=False)
    monkeypatch.delenv("HOPTRACE_REDRIVE_TOKEN", raising=False)
    at = app(id="pay-stalled-1")
    assert not at.exception
    assert not [b for b in at.button if "Redrive" in str(b.label)]


def test_dry_run_first_then_apply_on_confirmation(
    monkeypatch: pytest.MonkeyPatch, route: tuple[str, list[dict]]
) -> None:
    url, calls = route
    monkeypatch.setenv("HOPTRACE_REDRIVE_URL", url)
    monkeypatch.setenv("HOPTRACE_REDRIVE_TOKEN", "tok")
    at = app(id="pay-stalled-1")
    assert not at.exception and calls == []
    at.button(key="redrive_dry").click().run()
    assert not at.exception
    assert [(c["path"], c["auth"], c["apply"], c["id"]) for c in calls] == [
        ("/redrive", "Bearer tok", False, "pay-stalled-1")
    ]
    assert "the dead" in text(at) and "trainer.allocated" in text(at)  # the plan, as text
    at.button(key="redrive_apply").click().run()
    assert not at.exception
    assert [c["apply"] for c in calls] == [False, True]
    assert "1 record(s) sent" in at.success[-1].value
