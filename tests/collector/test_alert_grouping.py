"""Alerts that route and group like Prometheus alerts.

Before: 500 payments stuck behind one stopped worker raised 500 notifications (their only
distinguishing label was ``correlation_id``; the cause was an annotation, there was no severity)
and ``hoptrace_stalled_correlations`` had no labels. Now:

- hoptrace's own webhook posts one request per group (pipeline, step, cause), Alertmanager's
  webhook JSON, with the group's alerts, and one more per group when they resolve;
- ``hoptrace_stalled_correlations`` / ``hoptrace_failed_correlations`` carry
  ``{pipeline, step, cause}``, are exported by the stall-scan leader only, and dropped by a
  replica that loses the lease;
- ``deploy/prometheus/hoptrace-rules.yml`` is valid and names only what the collector exports;
- with the real pipeline, the real collector and the real Alertmanager grouping by
  ``[pipeline, step, cause]``: 50 payments stuck behind the stopped session-worker are ONE
  notification listing the 50, and ONE resolved notification once the worker is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.otlp_fuzz import CollectorProc
from hoptrace.collector import metrics, schema
from hoptrace.collector.alerts import (
    ALERTNAME,
    ALERTNAME_FAILED,
    CRITICAL,
    WARNING,
    AlertDispatcher,
    Targets,
)
from hoptrace.contract import Outcome, load_spec
from hoptrace.settings import PROJECT_ROOT

from ..support import delete_topics, wait_for
from ..workers.harness import HOPTRACE, Services, group_members, service_env
from .helpers import request, step_span
from .receiver import Receiver
from .test_alertmanager import running_alertmanager

PB = {"content-type": "application/x-protobuf"}
RULES = PROJECT_ROOT / "deploy" / "prometheus" / "hoptrace-rules.yml"
LEADERSHIP = "stall scan leadership acquired"
STUCK_GAUGES = ("hoptrace_stalled_correlations", "hoptrace_failed_correlations")


async def _post(http_url: str, spans: list) -> None:  # type: ignore[type-arg]
    async with httpx.AsyncClient(timeout=10) as h:
        r = await h.post(
            f"{http_url}/v1/traces", content=request(spans).SerializeToString(), headers=PB
        )
        assert r.status_code == 200, r.text


async def _true(value: object) -> object:
    return value or None


# ------------------------------------------------------------------ hoptrace's own webhook


def _by_group(posts: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for p in posts:
        g = p["groupLabels"]
        out.setdefault((g["pipeline"], g["step"], g["cause"]), []).append(p)
    return out


async def test_own_webhook_posts_one_request_per_group(make_collector, fast_spec: Path) -> None:  # type: ignore[no-untyped-def]
    """11 stalled payments in 3 (step, cause) groups: 3 firing requests listing them, then 3
    resolved ones; the labels route (severity, cause, service) and are the same when resolved."""
    causes = {"gone": "no_consumer", "lag": "consumer_lag"}

    async def cause_for(cid: str) -> tuple[str | None, str | None]:
        return causes[cid.split("-")[0]], f"{cid}: consumer group checked"

    async with Receiver() as rx:
        c = await make_collector(
            pipeline=fast_spec, alert_webhook_url=f"{rx.url}/hook", cause_for=cause_for
        )
        http = f"http://127.0.0.1:{c.http_port}"
        t0 = time.time_ns()
        groups = {
            ("payments", "purchase.created", "no_consumer"): [f"gone-{i}" for i in range(6)],
            ("payments", "purchase.created", "consumer_lag"): [f"lag-{i}" for i in range(3)],
            ("payments", "trainer.allocated", "no_consumer"): [f"gone-far-{i}" for i in range(2)],
        }
        spans = [step_span(cid, 0, start_ns=t0) for key, ids in groups.items() for cid in ids]
        far = groups[("payments", "trainer.allocated", "no_consumer")]
        spans += [step_span(cid, 1, start_ns=t0) for cid in far]  # done: stuck one step on
        await _post(http, spans)

        async def fired() -> Any:
            got = _by_group(rx.webhook("firing"))
            n = sum(len(p["alerts"]) for ps in got.values() for p in ps)
            return got if n >= 11 else None

        got = await wait_for(fired, timeout=30, what="the 11 firing alerts")
        scans = c.scanner.scans
        await wait_for(lambda: _true(c.scanner.scans >= scans + 5), what="5 more scans")
        got = _by_group(rx.webhook("firing"))
        assert set(got) == set(groups)
        for key, ids in groups.items():
            (post,) = got[key]  # one request per group
            assert sorted(a["labels"]["correlation_id"] for a in post["alerts"]) == sorted(ids)
            pipeline, step, cause = key
            service = "purchase-worker" if step == "purchase.created" else "allocation-worker"
            assert post["groupLabels"] == {"pipeline": pipeline, "step": step, "cause": cause}
            assert post["commonLabels"] == {
                "alertname": ALERTNAME,
                "severity": WARNING,
                "pipeline": pipeline,
                "step": step,
                "cause": cause,
                "service": service,
            }
            assert post["groupKey"] == (
                f'{{}}:{{cause="{cause}", pipeline="{pipeline}", step="{step}"}}'
            )
            assert post["version"] == "4" and post["status"] == "firing"
            assert all(a["status"] == "firing" for a in post["alerts"])
        # all of them move on (one request: one writer transaction resolves them together)
        done = [
            step_span(cid, k)
            for key, ids in groups.items()
            for cid in ids
            for k in range(2 if key[1] == "trainer.allocated" else 1, 4)
        ]
        await _post(http, done)

        async def resolved() -> Any:
            got = _by_group(rx.webhook("resolved"))
            n = sum(len(p["alerts"]) for ps in got.values() for p in ps)
            return got if n >= 11 else None

        back = await wait_for(resolved, timeout=30, what="the 11 resolved alerts")
        scans = c.scanner.scans
        await wait_for(lambda: _true(c.scanner.scans >= scans + 5), what="5 more scans")
        assert len(rx.webhook()) == 6  # 3 firing + 3 resolved requests, nothing else
        for key, ids in groups.items():
            (post,) = back[key]
            assert sorted(a["labels"]["correlation_id"] for a in post["alerts"]) == sorted(ids)
            assert all(a["status"] == "resolved" for a in post["alerts"])
            firing = {a["labels"]["correlation_id"]: a["labels"] for a in got[key][0]["alerts"]}
            for a in post["alerts"]:  # the same alerts for Alertmanager: the same labels
                assert a["labels"] == firing[a["labels"]["correlation_id"]]


async def test_labels_are_kept_when_the_diagnosis_comes_late(
    make_collector, fast_spec: Path, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    """An alert sent before its diagnosis answered (``diagnosis_wait`` over) is labelled
    ``cause="missing_evidence"`` and resolves with that label even though the cause was
    recorded meanwhile (Alertmanager would otherwise never see the first alert resolve)."""
    release = asyncio.Event()

    async def slow_cause(cid: str) -> tuple[str | None, str | None]:
        await release.wait()
        return "no_consumer", "late"

    async with Receiver() as rx:
        c = await make_collector(
            pipeline=fast_spec, alert_webhook_url=f"{rx.url}/hook", cause_for=slow_cause
        )
        c.dispatcher.diagnosis_wait = 0.5
        http = f"http://127.0.0.1:{c.http_port}"
        await _post(http, [step_span("late-1", 0)])
        (post,) = await wait_for(lambda: _true(rx.webhook("firing")), what="firing, undiagnosed")
        (alert,) = post["alerts"]
        assert alert["labels"]["cause"] == "missing_evidence"
        assert alert["labels"]["severity"] == WARNING
        release.set()
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            await wait_for(
                lambda: pool.fetchval("SELECT cause = 'no_consumer' FROM alerts"),
                what="the late cause recorded",
            )
            await _post(http, [step_span("late-1", k) for k in (1, 2, 3)])
            (done,) = await wait_for(lambda: _true(rx.webhook("resolved")), what="resolved")
            assert done["alerts"][0]["labels"] == alert["labels"]
        finally:
            await pool.close()


async def test_an_alert_sent_before_labels_were_kept_resolves_under_its_old_labels(
    db_url: str,
) -> None:
    """An alert an older collector sent (labels alertname/pipeline/step/correlation_id only,
    none kept) resolves under those: Alertmanager would otherwise hold the old one until its
    resolve_timeout and notify a new one. A new alert gets the full set."""
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=1))
        await conn.execute(
            "INSERT INTO alerts (correlation_id, pipeline, step, service, cause, diagnosed, "
            "status, resolved_at, delivered_firing) VALUES "
            "('old-1', 'payments', 'purchase.created', 'purchase-worker', 'no_consumer', true, "
            " 'resolved', now(), true), "
            "('new-1', 'payments', 'purchase.created', 'purchase-worker', 'no_consumer', true, "
            " 'firing', NULL, false)"
        )
    finally:
        await conn.close()
    async with Receiver() as rx:
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        targets = Targets(None, f"{rx.url}/hook", "http://d", "http://j")
        d = AlertDispatcher(pool, targets, lambda: True)
        try:
            assert await d.deliver_due() == 2
            kept = dict(await pool.fetch("SELECT correlation_id, labels::text FROM alerts"))
        finally:
            await d.aclose()
            await pool.close()
    got = {a["labels"]["correlation_id"]: a for p in rx.webhook() for a in p["alerts"]}
    assert got["old-1"]["status"] == "resolved"
    assert got["old-1"]["labels"] == {
        "alertname": ALERTNAME,
        "pipeline": "payments",
        "step": "purchase.created",
        "correlation_id": "old-1",
    }
    assert got["new-1"]["labels"]["cause"] == "no_consumer"
    assert got["new-1"]["labels"]["service"] == "purchase-worker"
    assert {cid: json.loads(text) for cid, text in kept.items()} == {
        cid: a["labels"] for cid, a in got.items()
    }


# ------------------------------------------------------------------ the stuck gauges


def _stuck_series(text: str) -> dict[tuple[str, str, str, str], float]:
    """(gauge, pipeline, step, cause) -> value of the stuck-correlation gauges in ``text``."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in STUCK_GAUGES:
            for s in fam.samples:
                lb = s.labels
                out[(fam.name, lb["pipeline"], lb["step"], lb.get("cause", ""))] = s.value
    return out


async def _scrape(col: CollectorProc) -> str:
    async with httpx.AsyncClient(timeout=10) as h:
        r = await h.get(f"{col.http}/metrics")
        assert r.status_code == 200
        return r.text


def _leads(col: CollectorProc) -> int:
    try:
        return col.log.read_text(errors="replace").count(LEADERSHIP)
    except OSError:
        return 0


@pytest.fixture
async def two_collectors(
    db_url: str, fast_spec: Path, tmp_path: Path
) -> AsyncIterator[tuple[CollectorProc, CollectorProc]]:
    env = {"HOPTRACE_STALL_SCAN_INTERVAL": "0.2", "HOPTRACE_STALL_GRACE": "0"}
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        procs.append(CollectorProc(db_url, fast_spec, tmp_path / name, extra_env=env))
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        yield procs[0], procs[1]
    finally:
        for p in procs:
            if p.proc is not None and p.proc.poll() is None:
                os.kill(p.proc.pid, signal.SIGCONT)  # a stopped process cannot exit
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))


async def _expected(db_url: str) -> dict[tuple[str, str, str, str], float] | None:
    """The stuck gauges as the store says, once every firing alert has its diagnosis."""
    conn = await asyncpg.connect(db_url)
    try:
        if await conn.fetchval("SELECT count(*) FROM alerts WHERE NOT diagnosed"):
            return None
        rows = await conn.fetch(
            "SELECT c.state, c.pipeline, coalesce(c.failed_step, c.next_step) AS step, "
            "coalesce(a.cause, 'missing_evidence') AS cause, count(*) AS n "
            "FROM correlations c JOIN alerts a ON a.correlation_id = c.correlation_id "
            "AND a.status = 'firing' WHERE c.state IN ('stalled', 'failed') GROUP BY 1, 2, 3, 4"
        )
    finally:
        await conn.close()
    return {
        (f"hoptrace_{r['state']}_correlations", r["pipeline"], r["step"], r["cause"]): float(r["n"])
        for r in rows
    }


async def test_stuck_gauges_are_labelled_and_only_the_leader_reports_them(
    two_collectors: tuple[CollectorProc, CollectorProc], db_url: str
) -> None:
    a, b = two_collectors
    await wait_for(
        lambda: _true((_leads(a) > 0) != (_leads(b) > 0)), timeout=20, what="one scan leader"
    )
    leader, other = (a, b) if _leads(a) else (b, a)
    # three payments stall before purchase.created, one fails there (through the other replica)
    spans = [step_span(f"g-stall-{i}", 0) for i in range(3)]
    spans += [step_span("g-fail", 0), step_span("g-fail", 1, outcome="error", error="dlq")]
    await _post(other.http, spans)

    async def as_stored() -> Any:
        want = await _expected(db_url)
        if not want or sum(want.values()) != 4:
            return None
        return want if _stuck_series(await _scrape(leader)) == want else None

    want = await wait_for(as_stored, timeout=60, what="the leader's gauges = the store's")
    print(f"stuck gauges on the leader: {want}")
    stalled = {k: v for k, v in want.items() if k[0] == STUCK_GAUGES[0]}
    assert sum(stalled.values()) == 3 and {k[2] for k in stalled} == {"purchase.created"}
    failed = {k: v for k, v in want.items() if k[0] == STUCK_GAUGES[1]}
    assert list(failed.values()) == [1.0] and next(iter(failed))[2] == "purchase.created"
    assert _stuck_series(await _scrape(other)) == {}  # no stale or duplicate series elsewhere

    # the leader freezes: the other takes over and reports them; the old one, awake again,
    # has lost the lease and drops its series
    assert leader.proc is not None
    os.kill(leader.proc.pid, signal.SIGSTOP)
    try:

        async def took_over() -> bool:
            return _stuck_series(await _scrape(other)) == want

        await wait_for(took_over, timeout=30, what="the new leader's gauges")
    finally:
        os.kill(leader.proc.pid, signal.SIGCONT)

    async def dropped() -> bool:
        text = await _scrape(leader)
        return _stuck_series(text) == {} and "hoptrace_stall_scan_leader 0.0" in text

    await wait_for(dropped, timeout=30, what="the old leader's series dropped")
    # the stalled payments complete: their series go away, the failure's stays
    await _post(other.http, [step_span(f"g-stall-{i}", k) for i in range(3) for k in (1, 2, 3)])

    async def only_the_failure() -> bool:
        return _stuck_series(await _scrape(other)) == failed

    await wait_for(only_the_failure, timeout=30, what="only the failure left")


# ------------------------------------------------------------------ the Prometheus rule file

_METRIC = re.compile(r"\bhoptrace_[a-z_]+\b")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_MATCHER = re.compile(r"(hoptrace_[a-z_]+)\{([^}]*)\}")
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_TEMPLATE_LABEL = re.compile(r"\$labels\.([A-Za-z_]+)")


def _exported() -> dict[str, tuple[str, ...]]:
    """Series names the collector exports -> their label names (counters with ``_total``)."""
    out: dict[str, tuple[str, ...]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = tuple(metric._labelnames)  # noqa: SLF001 - no public accessor
        for fam in metric.describe():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            for suffix in ("", *suffixes.get(fam.type, ())):
                out[fam.name + suffix] = labels
    return out


def test_rule_file_is_valid_and_names_only_what_the_collector_exports() -> None:
    """YAML shape, durations, the metrics and labels each expression names (PromQL itself is
    checked by promtool below, when it is built)."""
    exported = _exported()
    assert exported["hoptrace_stalled_correlations"] == metrics.STUCK_LABELS
    doc = yaml.safe_load(RULES.read_text())
    (group,) = doc["groups"]
    assert group["name"] and group["rules"]
    names = set()
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"] not in (ALERTNAME, ALERTNAME_FAILED), "clashes with hoptrace's own"
        names.add(rule["alert"])
        assert _DURATION.match(rule["for"]), rule["for"]
        assert rule["labels"]["severity"] in (CRITICAL, WARNING)
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")"), expr
        used = set(_METRIC.findall(expr))
        assert used and used <= set(exported), used - set(exported)
        by: set[str] = set()
        for group_labels in _BY.findall(expr):
            by |= {x.strip() for x in group_labels.split(",") if x.strip()}
        for metric in used:
            assert by <= set(exported[metric]), (metric, by)
        for metric, matchers in _MATCHER.findall(expr):
            for m in matchers.split(","):
                label, _, value = m.partition("=")
                assert label.strip() in exported[metric], (metric, label)
                if metric == "hoptrace_alert_deliveries_total":
                    assert value.strip().strip('"') in {o.value for o in Outcome}
        for text in rule["annotations"].values():
            assert text.count("{{") == text.count("}}"), text
            assert set(_TEMPLATE_LABEL.findall(text)) <= by, (rule["alert"], text)
    assert {"HoptraceStepStalled", "HoptraceStepFailing"} <= names


def _promtool() -> str | None:
    for cand in (
        os.environ.get("HOPTRACE_PROMTOOL_BIN"),
        str(PROJECT_ROOT / ".hoptrace" / "tools" / "bin" / "promtool"),
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return shutil.which("promtool")


def test_rule_file_passes_promtool() -> None:
    exe = _promtool()
    assert exe is not None, "promtool is not built: scripts/go-tools.sh promtool (make test does)"
    out = subprocess.run(
        [exe, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 4 rules found" in out.stdout, out.stdout


# ------------------------------------------------------------------ the real thing

STUCK = 50
#: Alertmanager's timers in the grouping test: the payments stall over a few seconds (their
#: deadlines, then their diagnoses), well inside GROUP_WAIT; the worker is started right after
#: the first notification, so every resolution lands before the group's next tick.
GROUP_WAIT, GROUP_INTERVAL = 15, 40
STOPPED = "session-worker"


def _deadlines(spec: Path, stopped_step: str) -> None:
    """Every deadline 60 s (nothing else stalls under load), the stopped worker's step 4 s."""
    blocks = spec.read_text().split("[[steps]]")
    out = [blocks[0]]
    for block in blocks[1:]:
        seconds = 4 if f'id = "{stopped_step}"' in block else 60
        out.append(
            re.sub(r'^deadline\s*=\s*"[^"]+"', f'deadline = "{seconds}s"', block, flags=re.M)
        )
    spec.write_text("[[steps]]".join(out))


def _run(env: dict[str, str], *args: str) -> None:
    res = subprocess.run([HOPTRACE, *args], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


async def _pay(h: httpx.AsyncClient, port: str) -> str:
    r = await h.post(
        f"http://127.0.0.1:{port}/payments",
        json={"student": "student-1", "course": "course-1", "amount": "49.00"},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["payment_id"])


async def _states(db_url: str, ids: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT state, count(*) AS n FROM correlations WHERE correlation_id = ANY($1) "
            "GROUP BY state",
            ids,
        )
    finally:
        await conn.close()
    return {r["state"]: r["n"] for r in rows}


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_fifty_payments_stuck_behind_one_stopped_worker_are_one_notification(
    db_url: str, kafka_bootstrap: str, spec_path: Path, suffix: str, tmp_path: Path
) -> None:
    _deadlines(spec_path, "session.created")
    async with Receiver() as rx:
        am_cfg = tmp_path / "alertmanager.yml"
        am_cfg.write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "hook",
                        "group_by": ["pipeline", "step", "cause"],
                        "group_wait": f"{GROUP_WAIT}s",
                        "group_interval": f"{GROUP_INTERVAL}s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {
                            "name": "hook",
                            "webhook_configs": [
                                {"url": f"{rx.url}/am-hook", "send_resolved": True}
                            ],
                        }
                    ],
                }
            )
        )
        async with running_alertmanager(am_cfg, tmp_path) as am_url:
            collector = CollectorProc(
                db_url,
                spec_path,
                tmp_path,
                extra_env={
                    "HOPTRACE_ALERTMANAGER_URL": am_url,
                    "HOPTRACE_KAFKA_BOOTSTRAP": kafka_bootstrap,
                    "HOPTRACE_STALL_SCAN_INTERVAL": "0.5",
                },
            )
            env = service_env(db_url, kafka_bootstrap, spec_path, None)
            env.pop("OTEL_TRACES_EXPORTER", None)
            services = Services(env, tmp_path)
            try:
                await asyncio.to_thread(collector.start, 60.0)
                env.update(
                    OTEL_EXPORTER_OTLP_ENDPOINT=collector.http,
                    OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                    OTEL_BSP_SCHEDULE_DELAY="100",
                )
                await asyncio.to_thread(_run, env, "topics", "ensure")
                await asyncio.to_thread(services.start_all)
                await _stuck_and_back(rx, db_url, kafka_bootstrap, services, suffix)
            finally:
                await asyncio.to_thread(services.stop_all)
                await asyncio.to_thread(collector.stop)
                await delete_topics(kafka_bootstrap, load_spec(spec_path).topics)


def _notes(rx: Receiver) -> list[dict[str, Any]]:
    return list(rx.posts.get("/am-hook", []))


async def _stuck_and_back(
    rx: Receiver, db_url: str, bootstrap: str, services: Services, suffix: str
) -> None:
    port = services.env["HOPTRACE_PAYMENT_SERVICE_PORT"]
    async with httpx.AsyncClient(timeout=30) as h:
        warm = await _pay(h, port)  # the pipeline works, and the group has committed offsets
        await wait_for(
            lambda: _completed(db_url, [warm]),
            timeout=90,
            what="the first payment completed",
        )
        await asyncio.to_thread(services.stop, STOPPED)
        group = f"{STOPPED}-{suffix}"
        await wait_for(
            lambda: _no_members(bootstrap, group), timeout=60, what=f"{group} without members"
        )
        t0 = time.monotonic()
        ids = list(await asyncio.gather(*(_pay(h, port) for _ in range(STUCK))))
    paid = time.monotonic() - t0

    async def first_note() -> Any:
        return _notes(rx) or None

    await wait_for(first_note, timeout=180, what="Alertmanager's first notification")
    t_note = time.monotonic()
    spread = await _spread(db_url, ids)  # how far apart their alerts reached Alertmanager
    await asyncio.to_thread(services.start, STOPPED)  # right after the group's first flush
    t_start = time.monotonic()

    async def resolved() -> Any:
        return [n for n in _notes(rx) if n["status"] == "resolved"] or None

    await wait_for(resolved, timeout=GROUP_INTERVAL + 120, what="the resolved notification")
    t_resolved = time.monotonic()
    notes = _notes(rx)
    print(
        f"{STUCK} payments posted in {paid:.1f}s; first notification {t_note - t0:.1f}s after "
        f"the first payment; worker ready {t_start - t_note:.1f}s later; resolved notification "
        f"{t_resolved - t_start:.1f}s after it started; notifications: {len(notes)}; the "
        f"alerts fired within {spread[0]:.1f}s and reached Alertmanager within {spread[1]:.1f}s "
        f"(group_wait {GROUP_WAIT}s)"
    )
    firing, done = notes[0], notes[-1]
    assert len(notes) == 2, [(n["status"], n["groupLabels"], len(n["alerts"])) for n in notes]
    # ONE notification listing the 50, grouped by pipeline/step/cause
    assert firing["status"] == "firing"
    assert firing["groupLabels"] == {
        "pipeline": "payments",
        "step": "session.created",
        "cause": "no_consumer",
    }
    assert sorted(a["labels"]["correlation_id"] for a in firing["alerts"]) == sorted(ids)
    common = firing["commonLabels"]
    assert common["service"] == STOPPED and common["severity"] == WARNING
    assert common["alertname"] == ALERTNAME
    assert all(a["status"] == "firing" for a in firing["alerts"])
    assert "start session-worker" in firing["alerts"][0]["annotations"]["evidence"]
    # ONE resolved notification once they completed
    assert done["groupLabels"] == firing["groupLabels"]
    assert sorted(a["labels"]["correlation_id"] for a in done["alerts"]) == sorted(ids)
    assert all(a["status"] == "resolved" for a in done["alerts"])
    assert await _states(db_url, ids) == {"completed": STUCK}


async def _completed(db_url: str, ids: list[str]) -> bool:
    return await _states(db_url, ids) == {"completed": len(ids)}


async def _no_members(bootstrap: str, group: str) -> bool:
    return await group_members(bootstrap, group) == 0


async def _spread(db_url: str, ids: list[str]) -> tuple[float, float]:
    """Seconds between the first and the last of the alerts of ``ids``: fired, first sent."""
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(
            "SELECT extract(epoch FROM max(fired_at) - min(fired_at)) AS fired, "
            "extract(epoch FROM max(last_sent_at) - min(last_sent_at)) AS sent "
            "FROM alerts WHERE correlation_id = ANY($1)",
            ids,
        )
    finally:
        await conn.close()
    return float(row["fired"] or 0), float(row["sent"] or 0)
