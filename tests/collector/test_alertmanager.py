"""Against a real Alertmanager (built by ``scripts/go-tools.sh alertmanager`` from tools/alertmanager;
looked up in $HOPTRACE_ALERTMANAGER_BIN, .hoptrace/tools/bin, then PATH): our v2 alerts are
accepted, routed to a webhook receiver, and resolved when the correlation completes; the shipped
route example (``deploy/alertmanager/route-example.yml``) loads and routes hoptrace's labels, and
a broken copy of it is refused at start (what makes "it loads" mean something)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from hoptrace.collector.alerts import Targets, alertmanager_payload
from hoptrace.settings import PROJECT_ROOT

from ..support import free_port, wait_for
from .helpers import request, step_span
from .receiver import Receiver

ROUTE_EXAMPLE = PROJECT_ROOT / "deploy" / "alertmanager" / "route-example.yml"


def _binary() -> str | None:
    for cand in (
        os.environ.get("HOPTRACE_ALERTMANAGER_BIN"),
        str(PROJECT_ROOT / ".hoptrace" / "tools" / "bin" / "alertmanager"),
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return shutil.which("alertmanager")


async def alertmanager_binary() -> str:
    """The Alertmanager executable (built by scripts/go-tools.sh when missing)."""
    exe = _binary()
    if exe is None:
        build = await asyncio.create_subprocess_exec(
            str(PROJECT_ROOT / "scripts" / "go-tools.sh"), "alertmanager"
        )
        assert await asyncio.wait_for(build.wait(), 1800) == 0
        exe = _binary()
    assert exe is not None, "alertmanager was not built by scripts/go-tools.sh alertmanager"
    return exe


@contextlib.asynccontextmanager
async def running_alertmanager(config: Path, workdir: Path) -> AsyncIterator[str]:
    """A real Alertmanager on a free port with ``config``; yields its URL once ready (its log:
    ``workdir/alertmanager.log``)."""
    exe = await alertmanager_binary()
    port = free_port()
    log = workdir / "alertmanager.log"
    with open(log, "ab") as out:  # noqa: ASYNC230 - a local log file, once
        proc = await asyncio.create_subprocess_exec(
            exe,
            f"--config.file={config}",
            f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as h:

            async def up() -> bool:
                assert proc.returncode is None, log.read_text(errors="replace")[-2000:]
                try:
                    return (await h.get(f"{url}/-/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_for(up, timeout=30, what="alertmanager ready")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


@pytest.fixture
async def alertmanager(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with Receiver() as rx:
        cfg = tmp_path / "am.yml"
        cfg.write_text(
            "route:\n  receiver: hook\n  group_by: [correlation_id]\n  group_wait: 0s\n"
            "  group_interval: 1s\n  repeat_interval: 1h\n"
            f"receivers:\n  - name: hook\n    webhook_configs:\n      - url: {rx.url}/am-hook\n        send_resolved: true\n"
        )
        async with running_alertmanager(cfg, tmp_path) as url:
            yield url, rx


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


def _stuck(cid: str, step: str, service: str, cause: str, kind: str = "stalled") -> dict:  # type: ignore[type-arg]
    """An alert row as the store holds it (the dispatcher's input)."""
    return {
        "correlation_id": cid,
        "pipeline": "payments",
        "step": step,
        "service": service,
        "cause": cause,
        "kind": kind,
        "status": "firing",
        "fired_at": datetime.now(UTC),
        "resolved_at": None,
    }


async def test_route_example_loads_and_groups_by_pipeline_step_cause(tmp_path: Path) -> None:
    """The shipped route, in a real Alertmanager: hoptrace's alerts (as the dispatcher builds
    them) are grouped by pipeline/step/cause, failed ones routed to the paging receiver."""
    rows = [_stuck(f"ex-{i}", "session.created", "session-worker", "no_consumer") for i in range(3)]
    rows.append(_stuck("ex-lag", "session.created", "session-worker", "consumer_lag"))
    rows.append(
        _stuck("ex-dlq", "trainer.allocated", "allocation-worker", "downstream_error", "failed")
    )
    targets = Targets(None, None, "http://dash", "http://jaeger")
    async with (
        running_alertmanager(ROUTE_EXAMPLE, tmp_path) as url,
        httpx.AsyncClient() as h,
    ):
        status = (await h.get(f"{url}/api/v2/status")).json()
        assert "group_by:\n  - pipeline\n  - step\n  - cause" in status["config"]["original"]
        r = await h.post(f"{url}/api/v2/alerts", json=alertmanager_payload(rows, targets))
        assert r.status_code == 200, r.text

        async def groups() -> dict | None:  # type: ignore[type-arg]
            got = {
                (
                    g["labels"].get("step"),
                    g["labels"].get("cause"),
                    g["receiver"]["name"],
                ): sorted(a["labels"]["correlation_id"] for a in g["alerts"])
                for g in (await h.get(f"{url}/api/v2/alerts/groups")).json()
            }
            return got if sum(len(v) for v in got.values()) == len(rows) else None

        got = await wait_for(groups, timeout=20, what="the alerts in their groups")
    assert got == {
        ("session.created", "no_consumer", "payments-oncall"): ["ex-0", "ex-1", "ex-2"],
        ("session.created", "consumer_lag", "payments-oncall"): ["ex-lag"],
        ("trainer.allocated", "downstream_error", "payments-page"): ["ex-dlq"],
    }


async def test_alertmanager_refuses_a_broken_route(tmp_path: Path) -> None:
    """The check above means something: a route naming a receiver that does not exist is
    refused at start."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        ROUTE_EXAMPLE.read_text().replace("receiver: payments-page", "receiver: nope")
    )
    exe = await alertmanager_binary()
    proc = await asyncio.create_subprocess_exec(
        exe,
        f"--config.file={broken}",
        f"--storage.path={tmp_path / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{free_port()}",
        "--cluster.listen-address=",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode != 0
    assert b"undefined receiver" in out and b"nope" in out, out[-2000:]
