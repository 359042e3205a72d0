"""The short chaos run (benchmarks/chaos.py --short) on a private stack: a service SIGKILLed and
restarted, the Kafka broker restarted, the collector stopped for a few seconds, session-worker
held down past its deadline, while payments flow. Nothing lost or duplicated (rows, handler
executions, emitted events), >= 99.9% of exported spans stored, delayed payments (at least one)
each alerted exactly once (firing + resolved), no alert for an on-time payment, no notification
sent twice, every diagnosis `completed`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--short", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.exists(), (
        f"no figures (exit {res.returncode}): {res.stdout[-3000:]}{res.stderr[-3000:]}"
    )
    r = json.loads(out.read_text())
    why = res.stdout[-2500:]
    assert r["drained"], why
    assert r["payments"] >= r["plan"]["payments"], why
    assert (r["lost"], r["duplicated"]) == (0, 0), why
    # duplicates a row count cannot see (tests/reliability/test_chaos_checks.py shows they fail)
    assert r["duplicated_handler_executions"] == r["duplicated_events"] == 0, why
    assert r["dead_letters"] == 0 and r["unrequested_payments"] == 0, why
    for step, runs in r["handler_executions"].items():
        assert runs == {"not_marked": 0, "marked_twice": 0, "ok_spans_twice": 0}, (step, why)
    for svc, s in r["spans"].items():
        assert s["completeness_pct"] is not None and s["completeness_pct"] >= 99.9, (svc, why)
    assert {"payment-service", "purchase-worker", "allocation-worker", "session-worker"} <= set(
        r["spans"]
    )
    assert r["completed"] == r["payments"], r["diagnosis"]
    assert all(c.get("cause") == "completed" for c in r["cli"]), r["cli"]
    a = r["alerts"]
    assert a["expected"] >= 1, a  # delayed payments (the stall): the alert checks bite
    assert not a["alerted_not_delayed"] and a["redelivered_notifications"] == 0, a
    assert not a["expected_without_alert"], a
    assert not a["not_exactly_one_firing_one_resolved"], a
    assert a["webhook_firing"] == a["webhook_resolved"] == a["table_rows"], a
    assert not r["unexpected_exits"], r["unexpected_exits"]
    assert any(e["event"] == "SIGKILL" for e in r["timeline"])
    assert any(e["event"] == "kafka-restart: back" for e in r["timeline"])
    assert any(e["event"] == "collector-stop: back" for e in r["timeline"])
    assert any(e["event"] == "stall: back" for e in r["timeline"])
    assert r["ok"] and res.returncode == 0, why
