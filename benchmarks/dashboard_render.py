"""Server-side render time of the dashboard's Lookup, Overview, Alerts and Payments pages on a
big store.

Fills a dedicated database (reused when already filled) with the collector's schema and
``--correlations`` payments x ``--spans-per`` spans (default 1M x 10 = 10M spans) using server-side
``INSERT ... SELECT generate_series``, spread over the last 24 hours: 90% completed, 5% in
progress, 4% stalled, 1% failed. Then times Streamlit's ``AppTest`` runs of the real pages
(through the collector API on the read-only role), cold (cache cleared) and warm.

    .venv/bin/python benchmarks/dashboard_render.py [--correlations N] [--runs R]

Prints the figures and writes ``benchmarks/results/dashboard_render.json``. Bar: <= 1 s each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
from common import create_database  # benchmarks/

from hoptrace.collector.schema import migrate
from hoptrace.settings import LOCAL_PG_PORT, PROJECT_ROOT

ADMIN_URL = os.environ.get(
    "HOPTRACE_BENCH_ADMIN_URL", f"postgresql://hoptrace:hoptrace@127.0.0.1:{LOCAL_PG_PORT}/hoptrace"
)
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "dashboard_render.json"
STEPS = [
    ("payment.confirmed", "payment-service"),
    ("purchase.created", "purchase-worker"),
    ("trainer.allocated", "allocation-worker"),
    ("session.created", "session-worker"),
]
CHUNK = 100_000  # correlations per INSERT statement


def _state_sql(g: str) -> str:
    """State of correlation number ``g`` (90/5/4/1 %)."""
    return (
        f"CASE WHEN {g} % 100 < 90 THEN 'completed' WHEN {g} % 100 < 95 THEN 'in_progress' "
        f"WHEN {g} % 100 < 99 THEN 'stalled' ELSE 'failed' END"
    )


def _done_sql(g: str) -> str:
    """Steps done by correlation ``g``: 4 when completed, else 2."""
    return f"CASE WHEN {g} % 100 < 90 THEN 4 ELSE 2 END"


def _t0_sql(g: str, n: int) -> str:
    return f"(now() - interval '24 hours' * ({g}::float8 / {n}))"


def _correlations_sql(lo: int, hi: int, n: int) -> str:
    steps_obj = ", ".join(
        f"""'{sid}', CASE WHEN {i} < {_done_sql("g")} THEN jsonb_build_object(
            'first_start', to_jsonb(t0 + interval '100 ms' * {i}),
            'last_end', to_jsonb(t0 + interval '100 ms' * {i} + interval '40 ms'),
            'done_at', to_jsonb(t0 + interval '100 ms' * {i} + interval '40 ms'),
            'outcome', 'ok', 'count', 1, 'ok', 1, 'duplicate', 0, 'error', 0) END"""
        for i, (sid, _svc) in enumerate(STEPS)
    )
    step_ids = "ARRAY[" + ", ".join(f"'{s}'" for s, _ in STEPS) + "]"
    return f"""
INSERT INTO correlations (correlation_id, pipeline, state, last_step, last_step_index,
    last_step_at, failed_step, failed_at, error, next_step, next_deadline, first_seen,
    updated_at, completed_at, steps)
SELECT 'bench-' || lpad(g::text, 8, '0'), 'payments', st,
    ({step_ids})[d], d - 1, t0 + interval '100 ms' * (d - 1) + interval '40 ms',
    CASE WHEN st = 'failed' THEN 'trainer.allocated' END,
    CASE WHEN st = 'failed' THEN t0 + interval '300 ms' END,
    CASE WHEN st = 'failed' THEN 'admin-service answered 500' END,
    CASE WHEN d < 4 THEN ({step_ids})[d + 1] END,
    CASE WHEN d < 4 THEN t0 + interval '30 s' END,
    t0, t0 + interval '1 s', CASE WHEN st = 'completed' THEN t0 + interval '340 ms' END,
    jsonb_strip_nulls(jsonb_build_object({steps_obj}))
FROM (SELECT g, {_state_sql("g")} AS st, {_done_sql("g")} AS d, {_t0_sql("g", n)} AS t0
      FROM generate_series({lo}, {hi - 1}) AS g) AS x
"""  # noqa: S608 - constants only


def _spans_sql(lo: int, hi: int, n: int, per: int) -> str:
    step_names = "ARRAY[" + ", ".join(f"'{s}'" for s, _ in STEPS) + "]"
    services = "ARRAY[" + ", ".join(f"'{v}'" for _, v in STEPS) + "]"
    return f"""
INSERT INTO spans (trace_id, span_id, parent_span_id, name, service, kind, start_time, end_time,
    duration_us, status_code, correlation_id, pipeline, step, outcome, attributes, received_at)
SELECT md5(g::text), substr(md5(g::text || '-' || j), 1, 16),
    CASE WHEN j > 0 THEN substr(md5(g::text || '-' || (j - 1)), 1, 16) END,
    CASE WHEN is_step THEN ({step_names})[j + 1] ELSE 'kafka.produce' END,
    ({services})[(j % 4) + 1], CASE WHEN is_step THEN 5 ELSE 4 END,
    t0 + interval '100 ms' * j, t0 + interval '100 ms' * j + interval '40 ms', 40000, 1,
    'bench-' || lpad(g::text, 8, '0'), 'payments',
    CASE WHEN is_step THEN ({step_names})[j + 1] END, CASE WHEN is_step THEN 'ok' END,
    jsonb_build_object('hoptrace.correlation_id', 'bench-' || lpad(g::text, 8, '0'),
        'messaging.destination.name', 'purchase-created', 'messaging.kafka.offset', g),
    t0 + interval '1 s'
FROM (SELECT g, {_done_sql("g")} AS d, {_t0_sql("g", n)} AS t0
      FROM generate_series({lo}, {hi - 1}) AS g) AS x,
     LATERAL (SELECT j, j < d AS is_step FROM generate_series(0, {per - 1}) AS j) AS y
"""  # noqa: S608 - constants only


async def fill(db_url: str, n: int, per: int) -> dict[str, float]:
    """Schema + data; skipped when the database already holds ``n`` correlations."""
    conn = await asyncpg.connect(db_url, command_timeout=3600)
    try:
        await migrate(conn, timedelta(days=7))
        have = await conn.fetchval("SELECT count(*) FROM correlations")
        spans = await conn.fetchval("SELECT count(*) FROM spans")
        if have == n and spans == n * per:
            print(f"reusing store: {have:,} correlations, {spans:,} spans")
            return {"fill_s": 0.0, "reused": 1.0}
        await conn.execute("TRUNCATE correlations, spans, alerts")
        t0 = time.perf_counter()
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            await conn.execute(_correlations_sql(lo, hi, n))
            await conn.execute(_spans_sql(lo, hi, n, per))
            print(
                f"  filled {hi:,}/{n:,} correlations ({time.perf_counter() - t0:.0f}s)", flush=True
            )
        await migrate(conn, timedelta(days=7))  # fills done_mask of the rows just inserted
        await conn.execute("ANALYZE correlations")
        await conn.execute("ANALYZE spans")
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{name}" TO hoptrace_ro')
        await conn.execute("GRANT USAGE ON SCHEMA public TO hoptrace_ro")
        await conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO hoptrace_ro")
        return {"fill_s": time.perf_counter() - t0, "reused": 0.0}
    finally:
        await conn.close()


async def ensure_db(name: str) -> str:
    return await create_database(ADMIN_URL, name, reuse=True)


def time_page(
    page: str | None, query: dict[str, str], runs: int, cold: bool, window: str | None = None
) -> list[float]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from hoptrace.dashboard.serve import APP

    out = []
    for _ in range(runs):
        if cold:
            st.cache_data.clear()
        at = AppTest.from_file(str(APP), default_timeout=120)
        for k, v in query.items():
            at.query_params[k] = v
        if page:
            at.switch_page(f"pages/{page}.py")
        if window:  # render once, then time the re-run with the chosen window
            at.run()
            if cold:
                st.cache_data.clear()
            at.selectbox(key="overview_window").set_value(window)
        t0 = time.perf_counter()
        at.run()
        out.append(time.perf_counter() - t0)
        failed = [e.value for e in at.error if "Could not" in e.value]
        if at.exception or failed:
            raise RuntimeError(f"{page or 'lookup'} failed: {at.exception or failed}")
    return out


def time_reads(stalled_id: str, runs: int) -> dict[str, dict[str, float]]:
    """The pages' reads alone (no rendering): the diagnosis (with its evidence), the overview's
    reads."""
    from datetime import UTC, datetime, timedelta

    from hoptrace.dashboard.api_source import ApiSource

    src = ApiSource.shared()
    out: dict[str, dict[str, float]] = {}
    for name, call in (
        ("lookup_reads", lambda: src.diagnose(stalled_id)),
        (
            "overview_1h_reads",
            lambda: src.read_overview(datetime.now(UTC) - timedelta(hours=1), 200),
        ),
        (
            "overview_24h_reads",
            lambda: src.read_overview(datetime.now(UTC) - timedelta(hours=24), 200),
        ),
    ):
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        out[name] = summary(samples)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "first_s": samples[0],
        "p50_s": statistics.median(s),
        "max_s": s[-1],
        "runs": len(s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--correlations", type=int, default=1_000_000)
    ap.add_argument("--spans-per", type=int, default=10)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--db", default="hoptrace_bench_dashboard")
    args = ap.parse_args()

    url = asyncio.run(ensure_db(args.db))
    print(f"store {args.db}: {args.correlations:,} correlations x {args.spans_per} spans")
    fill_info = asyncio.run(fill(url, args.correlations, args.spans_per))
    os.environ["HOPTRACE_DATABASE_URL"] = url
    # the dashboard reads with the local stack's read-only role, on this benchmark's database
    from urllib.parse import urlsplit

    from hoptrace.devstack import StackConfig

    readonly = urlsplit(StackConfig.from_env().readonly_database_url)
    os.environ["HOPTRACE_DASHBOARD_DATABASE_URL"] = readonly._replace(path=f"/{args.db}").geturl()
    os.environ.setdefault("HOPTRACE_PIPELINE", str(PROJECT_ROOT / "pipelines" / "payments.toml"))
    from hoptrace.settings import get_settings

    get_settings.cache_clear()
    stalled_id = f"bench-{args.correlations // 2 + 95:08d}"  # g % 100 == 95..98: stalled
    results: dict[str, object] = {
        "loadavg_1m_at_start": os.getloadavg()[0],
        "correlations": args.correlations,
        "spans": args.correlations * args.spans_per,
        **fill_info,
    }
    # warm the process (imports, pool, Kafka clients) once, outside the figures
    time_page(None, {"id": stalled_id}, 1, cold=True)
    results["lookup_stalled"] = summary(time_page(None, {"id": stalled_id}, args.runs, cold=True))
    results["overview_1h_cold"] = summary(time_page("overview", {}, args.runs, cold=True))
    results["overview_1h_cached"] = summary(time_page("overview", {}, args.runs, cold=False))
    results["overview_24h_cold"] = summary(
        time_page("overview", {}, args.runs, cold=True, window="24 hours")
    )
    results["alerts_cold"] = summary(time_page("alerts", {}, args.runs, cold=True))
    # the Payments page: a filtered hour (stuck ones) and the newest page of a whole day
    stuck = {"state": "stalled,failed", "window": "1h", "refresh": "off"}
    results["payments_stuck_1h_cold"] = summary(time_page("payments", stuck, args.runs, cold=True))
    day = {"window": "24h", "refresh": "off"}
    results["payments_24h_cold"] = summary(time_page("payments", day, args.runs, cold=True))
    results.update(time_reads(stalled_id, args.runs))
    results["loadavg_1m_at_end"] = os.getloadavg()[0]
    results["cpus"] = os.cpu_count() or 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for key in (
        "lookup_stalled",
        "overview_1h_cold",
        "payments_stuck_1h_cold",
        "payments_24h_cold",
    ):
        p50 = results[key]["p50_s"]  # type: ignore[index]
        print(f"{key}: p50 {p50 * 1000:.0f} ms  ({'PASS' if p50 <= 1.0 else 'FAIL'} bar 1 s)")


if __name__ == "__main__":
    Path(RESULTS.parent).mkdir(parents=True, exist_ok=True)
    main()
