"""Against a real Alertmanager (built by ``scripts/go-tools.sh alertmanager`` from tools/alertmanager;
looked up in $HOPTRACE_ALERTMANAGER_BIN, .hoptrace/tools/bin, then PATH): our v2 alerts are
accepted, routed to a webhook receiver, and resolved when the correlation completes."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from hoptrace.settings import PROJECT_ROOT

from ..support import free_port, wait_for
from .helpers import request, step_span
from .receiver import Receiver


def _binary() -> str | None:
    for cand in (
        os.environ.get("HOPTRACE_ALERTMANAGER_BIN"),
        str(PROJECT_ROOT / ".hoptrace" / "tools" / "bin" / "alertmanager"),
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return shutil.which("alertmanager")


@pytest.fixture
async def alertmanager(tmp_path: Path):  # type: ignore[no-untyped-def]
    exe = _binary()
    if exe is None:
        build = await asyncio.create_subprocess_exec(
            str(PROJECT_ROOT / "scripts" / "go-tools.sh"), "alertmanager"
        )
        assert await asyncio.wait_for(build.wait(), 1800) == 0
        exe = _binary()
    assert exe is not None, "alertmanager was not built by scripts/go-tools.sh alertmanager"
    async with Receiver() as rx:
        cfg = tmp_path / "am.yml"
        cfg.write_text(
            "route:\n  receiver: hook\n  group_by: [correlation_id]\n  group_wait: 0s\n"
            "  group_interval: 1s\n  repeat_interval: 1h\n"
            f"receivers:\n  - name: hook\n    webhook_configs:\n      - url: {rx.url}/am-hook\n        send_resolved: true\n"
        )
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            exe,
            f"--config.file={cfg}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as h:

                async def up() -> bool:
                    try:
                        return (await h.get(f"{url}/-/ready")).status_code == 200
                    except httpx.HTTPError:
                        return False

                await wait_for(up, timeout=20, what="alertmanager ready")
            yield url, rx
        finally:
            proc.terminate()
            await proc.wait()


async def test_real_alertmanager_fires_and_resolves(
    alertmanager, make_collector, fast_spec: Path
) -> None:  # type: ignore[no-untyped-def]
    am_url, rx = alertmanager
    c = await make_collector(pipeline=fast_spec, alertmanager_url=am_url)
    async with httpx.AsyncClient() as h:
        body = request([step_span("am-1", 0, start_ns=time.time_ns())]).SerializeToString()
        r = await h.post(
            f"http://127.0.0.1:{c.http_port}/v1/traces",
            content=body,
            headers={"content-type": "application/x-protobuf"},
        )
        assert r.status_code == 200

        async def active() -> list:  # type: ignore[type-arg]
            alerts = (await h.get(f"{am_url}/api/v2/alerts")).json()
            return [
                a
                for a in alerts
                if a["labels"].get("correlation_id") == "am-1" and a["status"]["state"] == "active"
            ]

        got = await wait_for(active, timeout=20, what="alert active in alertmanager")
        assert got[0]["labels"]["alertname"] == "HoptraceStalledCorrelation"
        assert got[0]["labels"]["step"] == "purchase.created"
        assert got[0]["annotations"]["dashboard_url"].endswith("/?id=am-1")
        notified = await wait_for(
            lambda: _posts(rx, "firing"), timeout=20, what="AM webhook firing"
        )
        assert notified[0]["alerts"][0]["labels"]["correlation_id"] == "am-1"
        body = request([step_span("am-1", i) for i in (1, 2, 3)]).SerializeToString()
        r = await h.post(
            f"http://127.0.0.1:{c.http_port}/v1/traces",
            content=body,
            headers={"content-type": "application/x-protobuf"},
        )
        assert r.status_code == 200
        await wait_for(lambda: _posts(rx, "resolved"), timeout=30, what="AM webhook resolved")
        assert await active() == []


async def _posts(rx: Receiver, status: str) -> list:  # type: ignore[type-arg]
    return [p for p in rx.posts.get("/am-hook", []) if p["status"] == status]
