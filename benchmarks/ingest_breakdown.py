"""Where PostgreSQL's write cost per span goes: the collector's own writer (``Writer``) run in this
process on one pooled connection, fed the same natively decoded realistic batches (the ingest
benchmark's load, decoded before the clock starts), once per variant of the store, each on a
fresh database; variants alternate over ``--reps`` repetitions, medians reported.

Measured per variant: CPU µs per span of the one PostgreSQL backend doing the writes (exact,
from /proc: the server's other processes are shared with other users, their figure is noisy and
given apart), the writer's own Python CPU per span, spans/s of the sequential writer, and the
bytes per span of the heap, of each index and of TOAST after the run. A variant's saving is the
baseline's backend µs per span minus its own.

Variants (experiments, not product settings):
- ``baseline``: the store as the collector makes it (2 writers write concurrently in the
  collector; here one writes, so the figures are CPU, not contention).
- ``no_fold``: COPY only, no per-correlation state fold (``Writer._fold`` skipped).
- ``fold_without_settle`` (``_unpark``): the fold without ``runs.settle`` (the foreign runs'
  queries on ``spans``: failures below them, their trace's correlation id) (and ``runs.unpark``).
- ``no_correlation_index``: ``spans_correlation_idx`` dropped (correlation lookups need it).
- ``no_primary_key``: the primary key dropped (duplicate detection and trace lookups need it).
- ``no_span_indexes``: both dropped: the heap alone.
- ``unlogged``: the span partitions ``UNLOGGED`` (no WAL for spans; lost on a crash).
- ``synchronous_commit_on``: the server default is ``off`` on the local stack; the cost of on.
- ``attributes_bytea``: ``attributes`` and ``resource`` stored as ``bytea`` (the same bytes as
  the jsonb COPY input, not parsed: what jsonb costs for spans nobody queries by them; ``events``
  stays jsonb, the fold reads it). ``resource_bytea``: the resource alone (the same for every
  span of a request).
- ``batch_1000`` / ``batch_20000``: write batches of that many spans instead of 5,000.
- ``floor``: unlogged, no span indexes, bytea, no fold: what a row costs at all.

``--e2e N``: then the whole collector (``hoptrace collector`` at saturation, as in the ingest
benchmark, N rounds alternating) with the store variants that need no code change (indexes dropped,
unlogged, bytea, all of them; batch size), for what each does to spans/s end to end.

Run: ``.venv/bin/python benchmarks/ingest_breakdown.py [--spans 120000] [--reps 3] [--e2e 0]``;
JSON to ``benchmarks/results/ingest_breakdown.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from common import create_database, drop_database  # benchmarks/
from ingest_hoptrace import hoptrace_run
from ingest_load import realistic_template
from ingest_measure import median, postgres_cpu, proc_cpu

from hoptrace.collector import runs, schema
from hoptrace.collector.decode import DecodeKeys, Encoded, decode_body
from hoptrace.collector.writer import Writer, init_connection
from hoptrace.contract import load_spec
from hoptrace.settings import CHECKOUT_SPEC

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RETENTION = timedelta(days=7)

_PARTITIONS = (
    "SELECT c.oid::regclass::text AS name, c.oid FROM pg_inherits i "
    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'spans'::regclass"
)
_DROP_CORR = "DROP INDEX spans_correlation_idx"
_DROP_PK = "ALTER TABLE spans DROP CONSTRAINT spans_pkey"
_BYTEA = "ALTER TABLE spans " + ", ".join(
    f"ALTER COLUMN {c} DROP DEFAULT, ALTER COLUMN {c} TYPE bytea USING convert_to({c}::text, 'UTF8')"
    for c in ("attributes", "resource")
)
_RESOURCE_BYTEA = (
    "ALTER TABLE spans ALTER COLUMN resource DROP DEFAULT, "
    "ALTER COLUMN resource TYPE bytea USING convert_to(resource::text, 'UTF8')"
)
_UNLOGGED = "UNLOGGED"  # marker: every span partition SET UNLOGGED


@dataclass
class Variant:
    name: str
    sql: list[str] = field(default_factory=list)
    fold: bool = True
    #: ``runs`` functions of the fold replaced by no-ops (their queries' share of the fold)
    skip: tuple[str, ...] = ()
    batch: int = 5000
    settings: dict[str, str] = field(default_factory=dict)


VARIANTS = [
    Variant("baseline"),
    Variant("no_fold", fold=False),
    Variant("fold_without_settle", skip=("settle",)),
    Variant("fold_without_settle_unpark", skip=("settle", "unpark")),
    Variant("no_correlation_index", [_DROP_CORR]),
    Variant("no_primary_key", [_DROP_PK]),
    Variant("no_span_indexes", [_DROP_CORR, _DROP_PK]),
    Variant("unlogged", [_UNLOGGED]),
    Variant("synchronous_commit_on", settings={"synchronous_commit": "on"}),
    Variant("attributes_bytea", [_BYTEA]),
    Variant("resource_bytea", [_RESOURCE_BYTEA]),
    Variant("batch_1000", batch=1000),
    Variant("batch_20000", batch=20000),
    Variant("floor", [_DROP_CORR, _DROP_PK, _BYTEA, _UNLOGGED], fold=False),
]


def decoded_requests(spans: int) -> list[Encoded]:
    """Realistic requests of at least ``spans`` spans, natively decoded as the collector's
    receiver does (with the reference spec's decode keys: its candidate spans too)."""
    keys = DecodeKeys.for_spec(load_spec(CHECKOUT_SPEC))
    template = realistic_template()
    out: list[Encoded] = []
    n = 0
    now = datetime.now(UTC)
    while n < spans:
        for body, _k in template.fresh():
            enc = decode_body(body, now, keys=keys).encoded
            assert enc is not None, "the native decoder must be built"
            out.append(enc)
            n += enc.n
    return out


def batched(requests: list[Encoded], batch: int) -> list[list[Encoded]]:
    """Requests grouped as the queue hands them to a writer (whole requests, >= ``batch``)."""
    out: list[list[Encoded]] = [[]]
    n = 0
    for r in requests:
        if n >= batch:
            out.append([])
            n = 0
        out[-1].append(r)
        n += r.n
    return out


async def _sizes(conn: asyncpg.Connection) -> dict[str, int]:
    """Bytes of the span partitions' heaps, TOAST, primary key and other indexes."""
    parts = await conn.fetch(_PARTITIONS)
    oids = [p["oid"] for p in parts]
    heap = await conn.fetchval(
        "SELECT coalesce(sum(pg_relation_size(oid)), 0) FROM unnest($1::oid[]) oid", oids
    )
    toast = await conn.fetchval(
        "SELECT coalesce(sum(pg_total_relation_size(c.reltoastrelid)), 0) FROM pg_class c "
        "WHERE c.oid = ANY($1::oid[]) AND c.reltoastrelid <> 0",
        oids,
    )
    idx = await conn.fetch(
        "SELECT x.indisprimary AS pk, pg_relation_size(x.indexrelid) AS size FROM pg_index x "
        "WHERE x.indrelid = ANY($1::oid[])",
        oids,
    )
    return {
        "heap": int(heap),
        "toast": int(toast),
        "primary_key": sum(r["size"] for r in idx if r["pk"]),
        "other_indexes": sum(r["size"] for r in idx if not r["pk"]),
    }


async def run_variant(admin: str, requests: list[Encoded], v: Variant) -> dict[str, Any]:
    spec = load_spec(CHECKOUT_SPEC)
    db_url = await create_database(admin)
    pool = None
    try:
        conn = await asyncpg.connect(db_url)
        try:
            await schema.migrate(conn, RETENTION, spec=spec)
            await apply_sql(conn, v.sql)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(
            db_url, min_size=1, max_size=1, init=init_connection, server_settings=v.settings
        )
        writer = Writer(pool, spec, RETENTION)
        if not v.fold:

            async def no_fold(*_a: object) -> None:
                return None

            writer._fold = no_fold  # type: ignore[method-assign]
        saved = {name: getattr(runs, name) for name in v.skip}
        for name in v.skip:

            async def nothing(*_a: object) -> dict:
                return {}

            setattr(runs, name, nothing)
        async with pool.acquire() as c:
            pid = await c.fetchval("SELECT pg_backend_pid()")
        batches = batched(requests, v.batch)
        pg0, be0, py0, t0 = postgres_cpu(), proc_cpu(pid), time.process_time(), time.perf_counter()
        stored = 0
        for b in batches:
            stored += await writer.write_spans(b)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
        be, py, pg1 = proc_cpu(pid) - be0, time.process_time() - py0, postgres_cpu()
        for name, fn in saved.items():
            setattr(runs, name, fn)
        pg_other = sum(c - pg0.get(p, 0.0) for p, c in pg1.items() if p != pid)
        async with pool.acquire() as c:
            count = await c.fetchval("SELECT count(*) FROM spans")
            correlations = await c.fetchval("SELECT count(*) FROM correlations")
            sizes = await _sizes(c)
        per = 1e6 / max(count, 1)
        return {
            "spans": count,
            "stored_reported": stored,
            "correlations": correlations,
            "batches": len(batches),
            "pg_backend_us_per_span": round(be * per, 2),
            "pg_other_processes_us_per_span_noisy": round(pg_other * per, 2),
            "writer_python_us_per_span": round(py * per, 2),
            "spans_per_s_one_writer": round(count / wall),
            "bytes_per_span": {k: round(s / max(count, 1), 1) for k, s in sizes.items()},
        }
    finally:
        if pool is not None:
            await pool.close()
        await drop_database(admin, db_url)


#: End-to-end variants: (name, SQL run on the collector's migrated store, collector settings).
E2E: list[tuple[str, list[str], dict[str, str]]] = [
    ("baseline", [], {}),
    ("no_span_indexes", [_DROP_CORR, _DROP_PK], {}),
    ("unlogged", [_UNLOGGED], {}),
    ("attributes_bytea", [_BYTEA], {}),
    ("unlogged_bytea_no_span_indexes", [_DROP_CORR, _DROP_PK, _BYTEA, _UNLOGGED], {}),
    ("batch_20000", [], {"HOPTRACE_WRITE_BATCH_SPANS": "20000"}),
]


async def apply_sql(conn: asyncpg.Connection, sqls: list[str]) -> None:
    for sql in sqls:
        if sql == _UNLOGGED:
            for p in await conn.fetch(_PARTITIONS):
                await conn.execute(f"ALTER TABLE {p['name']} SET UNLOGGED")
        else:
            await conn.execute(sql)


async def e2e(args: argparse.Namespace, admin: str) -> dict:
    """The whole collector at saturation per variant, ``args.e2e`` rounds alternating."""
    ns = argparse.Namespace(
        spans=args.e2e_spans, workers=2, concurrency=4, writers=2, batch=5000, queue=50_000,
        timeout=300, rate=0,
    )  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name, _s, _e in E2E}
    for rep in range(args.e2e):
        order = E2E[rep % len(E2E) :] + E2E[: rep % len(E2E)]
        for name, sqls, env in order:

            async def prepare(conn: asyncpg.Connection, sqls: list[str] = sqls) -> None:
                await apply_sql(conn, sqls)

            r = await hoptrace_run(
                ns, admin, "realistic", probes=False, tag=f"e2e-{name}", env=env, prepare=prepare
            )
            runs[name].append(r["saturation"])
            print(f"e2e rep {rep + 1} {name}: {r['saturation']['spans_per_s_overall']} spans/s")
    keys = ("spans_per_s_overall", "collector_cpu_us_per_span", "pg_cpu_us_per_span")
    return {
        "spans_per_run": args.e2e_spans,
        "summary": {
            name: {
                **{f"median_{k}": round(median([r[k] for r in rs]), 1) for k in keys},
                "lost": sum(r["lost"] for r in rs),
            }
            for name, rs in runs.items()
        },
        "runs": runs,
    }


async def main_async(args: argparse.Namespace) -> dict:
    from hoptrace import devstack

    admin = devstack.StackConfig.from_env().database_url
    requests = decoded_requests(args.spans)
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    runs: dict[str, list[dict]] = {v.name: [] for v in chosen}
    out: dict[str, Any] = {
        "spans_per_variant": sum(r.n for r in requests),
        "mix": "realistic (16 spans per payment, 4 step spans; 5 requests per 96 payments)",
        "loadavg_before": os.getloadavg(),
        "server": "local stack PostgreSQL (synchronous_commit=off, shared_buffers=512MB)",
    }
    for rep in range(args.reps):
        order = chosen[rep % len(chosen) :] + chosen[: rep % len(chosen)]
        for v in order:
            runs[v.name].append(await run_variant(admin, requests, v))
            print(f"rep {rep + 1} {v.name}: {runs[v.name][-1]['pg_backend_us_per_span']} µs")
    base = median([r["pg_backend_us_per_span"] for r in runs.get("baseline", [])])
    summary: dict[str, dict] = {}
    for name, rs in runs.items():
        if not rs:
            continue
        us = median([r["pg_backend_us_per_span"] for r in rs])
        summary[name] = {
            "pg_backend_us_per_span": round(us, 2),
            "saved_us_per_span_vs_baseline": round(base - us, 2),
            "writer_python_us_per_span": round(
                median([r["writer_python_us_per_span"] for r in rs]), 2
            ),
            "spans_per_s_one_writer": round(median([r["spans_per_s_one_writer"] for r in rs])),
            "bytes_per_span": rs[-1]["bytes_per_span"],
        }
    out["summary"] = summary
    out["runs"] = runs
    if args.e2e:
        out["end_to_end"] = await e2e(args, admin)
    out["loadavg_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=120_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--e2e", type=int, default=0, help="rounds of the end-to-end variants")
    ap.add_argument("--e2e-spans", type=int, default=150_000)
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest_breakdown.json").write_text(json.dumps(result, indent=2))
    print(f"{'variant':<24} {'PG µs/span':>10} {'saved':>7} {'py µs':>6} {'spans/s':>8}")
    for name, s in result["summary"].items():
        print(
            f"{name:<24} {s['pg_backend_us_per_span']:>10} "
            f"{s['saved_us_per_span_vs_baseline']:>7} {s['writer_python_us_per_span']:>6} "
            f"{s['spans_per_s_one_writer']:>8,}"
        )
    for name, s in result.get("end_to_end", {}).get("summary", {}).items():
        print(f"e2e {name:<32} {s}")
    print(f"loadavg before {result['loadavg_before']}, after {result['loadavg_after']}")


if __name__ == "__main__":
    main()
