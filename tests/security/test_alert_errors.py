"""Regression: a failed alert delivery stored ``str(exc)`` as the alert's ``last_error`` (shown to
operators); httpx puts the full request URL in it, so a webhook token (Slack-style path) or a
password in the URL leaked. Now the secret parts are redacted."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import asyncpg
import pytest

from hoptrace.collector import schema
from hoptrace.collector.alerts import AlertDispatcher, Targets, redact

SECRET_PATH = f"T0/B0/{uuid.uuid4().hex}"
PASSWORD = f"pw{uuid.uuid4().hex}"


@pytest.fixture
def failing_server() -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_redact_cuts_urls_to_scheme_and_host() -> None:
    url = f"https://user:{PASSWORD}@hooks.example:8443/services/{SECRET_PATH}?token=abc123"
    text = redact(f"Server error '500' for url '{url}'", (None, url))
    assert PASSWORD not in text and SECRET_PATH not in text and "abc123" not in text
    assert "https://hooks.example:8443/<redacted>" in text


@pytest.mark.parametrize("target", ["webhook", "alertmanager"])
async def test_failed_delivery_error_holds_no_secret(
    db_url: str, failing_server: int, target: str
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=7))
        alert_id = await conn.fetchval(
            "INSERT INTO alerts (correlation_id, step, diagnosed) VALUES ('c-1', 's', true) "
            "RETURNING id"
        )
    finally:
        await conn.close()
    if target == "webhook":
        url = f"http://127.0.0.1:{failing_server}/services/{SECRET_PATH}"
        targets = Targets(None, url, "http://dash", "http://jaeger")
    else:
        url = f"http://admin:{PASSWORD}@127.0.0.1:{failing_server}"
        targets = Targets(url, None, "http://dash", "http://jaeger")
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        dispatcher = AlertDispatcher(pool, targets, lambda: True)
        try:
            assert await dispatcher.deliver_due() == 0
        finally:
            await dispatcher.aclose()
        error = await pool.fetchval("SELECT last_error FROM alerts WHERE id = $1", alert_id)
    finally:
        await pool.close()
    assert error and "500" in error, error
    assert SECRET_PATH not in error and PASSWORD not in error, error
    assert f"127.0.0.1:{failing_server}" in error  # still says where it failed
