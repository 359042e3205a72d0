"""Collector ingest benchmark: hoptrace against Jaeger in-memory and Jaeger with Badger, in one run.

Span mixes (:mod:`ingest_load`):

- ``realistic`` (the bar is judged on this one): the reference pipeline's real span mix, copied
  from a real payment trace (:mod:`ingest_trace`: 16 spans per payment, 4 of them step spans).
  Requests are per service, as the SDKs export them, so one correlation's step spans arrive in 4
  different requests (1 insert + 3 updates of its state).
- ``worst_case``: every span a step span (512-span requests, all 4 steps of a correlation in the
  same request).

Rounds (``--rounds N``, default 3): each round runs, on the same realistic load at saturation,
hoptrace (a fresh ``hoptrace collector`` and database, :mod:`ingest_hoptrace`), Jaeger v2 with
in-memory storage and Jaeger v2 with Badger (:mod:`ingest_jaeger`), the order rotating from round
to round. Per peer: the median spans/s, CPU µs per span (the process; for hoptrace the collector
plus PostgreSQL's processes for its database, other users' left out) and loss, and the medians
of the per-round ratios hoptrace/Jaeger-memory and hoptrace/Jaeger-Badger.

Then, once: the other mixes (``--mix``), the receive-to-queryable latency idle and at a fixed
rate (``--rate``, 0: off), and the stall scan with ``--correlations`` in flight (0: skipped).

Run: ``.venv/bin/python benchmarks/ingest.py [--rounds 3] [--spans 300000] [--mix realistic]``.
JSON (every round's figures and the medians) goes to ``benchmarks/results/ingest.json``; a short
table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from common import create_database, drop_database  # benchmarks/
from ingest_hoptrace import add_collector_options, hoptrace_run
from ingest_jaeger import jaeger_run
from ingest_load import TEMPLATES, build_template, fresh  # noqa: F401 - benchmarks/decode.py imports them here
from ingest_measure import median
from ingest_scan import scan_phase

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PEERS = ("hoptrace", "jaeger_memory", "jaeger_badger")


def save(result: dict) -> None:
    """Write the results so far (a later phase failing keeps the earlier figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2))


def _figures(peer: str, run: dict) -> dict:
    """spans/s, CPU µs per span, loss of one peer's run."""
    sat = run.get("saturation", run)
    return {
        "spans_per_s": sat.get("spans_per_s_overall"),
        "cpu_us_per_span": sat.get("cpu_us_per_span"),
        "lost": sat.get("lost"),
    }


def summarize(rounds: list[dict]) -> dict:
    """Per peer medians over the rounds, and the medians of the per-round ratios."""
    out: dict = {}
    for peer in PEERS:
        figs = [_figures(peer, r[peer]) for r in rounds if peer in r and "skipped" not in r[peer]]
        if not figs:
            continue
        out[peer] = {
            "median_spans_per_s": round(median([f["spans_per_s"] for f in figs])),
            "median_cpu_us_per_span": round(median([f["cpu_us_per_span"] for f in figs]), 1),
            "lost_total": sum(f["lost"] or 0 for f in figs),
            "rounds": len(figs),
        }
    for other in PEERS[1:]:
        ratios = [
            _figures("hoptrace", r["hoptrace"])["spans_per_s"]
            / _figures(other, r[other])["spans_per_s"]
            for r in rounds
            if "hoptrace" in r and other in r and "skipped" not in r[other]
        ]
        if ratios:
            out[f"ratio_hoptrace_to_{other}"] = round(median(ratios), 2)
            out[f"ratios_hoptrace_to_{other}_per_round"] = [round(x, 2) for x in ratios]
    return out


def table(summary: dict) -> str:
    lines = [f"{'peer':<15} {'spans/s':>9} {'CPU µs/span':>12} {'lost':>6}"]
    for peer in PEERS:
        if peer in summary:
            s = summary[peer]
            lines.append(
                f"{peer:<15} {s['median_spans_per_s']:>9,} {s['median_cpu_us_per_span']:>12} "
                f"{s['lost_total']:>6}"
            )
    for other in PEERS[1:]:
        key = f"ratio_hoptrace_to_{other}"
        if key in summary:
            lines.append(f"hoptrace / {other}: {summary[key]} (median of rounds)")
    return "\n".join(lines)


async def one_round(args: argparse.Namespace, admin: str, k: int) -> dict:
    """hoptrace, Jaeger in-memory, Jaeger Badger on the realistic load; the order rotates."""
    peers = [p for p in PEERS if args.jaeger or p == "hoptrace"]
    shift = k % len(peers)
    out: dict = {"order": peers[shift:] + peers[:shift], "loadavg_before": os.getloadavg()}
    for peer in out["order"]:
        if peer == "hoptrace":
            out[peer] = await hoptrace_run(args, admin, "realistic", probes=False)
        else:
            out[peer] = await jaeger_run(args, "realistic", peer.removeprefix("jaeger_"))
    return out


async def main_async(args: argparse.Namespace) -> dict:
    import hoptrace_native  # noqa: F401 - the native decoder must be built for this figure

    from hoptrace import devstack

    admin = devstack.StackConfig.from_env().database_url
    out: dict = {
        "cpu_count": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "spans_per_run": args.spans,
        "decoder": "native (hoptrace_native.decode_traces -> binary COPY)",
        "load_generator": "separate processes, requests built before the clock starts, lean "
        "keep-alive HTTP/1.1 client, 503 -> retry after 50 ms",
        "bar_judged_on": "realistic",
        "cpu_per_span": "hoptrace: collector process + PostgreSQL for this run (its backends, "
        "autovacuum of its database, the server's shared processes); Jaeger: its process "
        "(Badger is embedded in it)",
        "rounds": [],
    }
    for k in range(args.rounds):
        out["rounds"].append(await one_round(args, admin, k))
        out["summary"] = summarize(out["rounds"])
        save(out)
    for mix in args.mixes:
        if mix == "realistic" and not (args.rate or args.rounds == 0):
            continue  # the rounds measured it; the probes need --rate
        out[mix] = await hoptrace_run(args, admin, mix, probes=bool(args.rate))
        save(out)
    if args.correlations:
        db_url = await create_database(admin)
        try:
            out["stall_scan"] = await scan_phase(db_url, args.correlations)
        finally:
            await drop_database(admin, db_url)
    out["loadavg_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three peers")
    ap.add_argument("--mix", default="realistic,worst_case", help="mixes run once after them")
    ap.add_argument("--spans", type=int, default=300_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    add_collector_options(ap)
    ap.add_argument("--rate", type=float, default=50_000, help="fixed-rate phase, spans/s (0: off)")
    ap.add_argument("--rate-seconds", type=float, default=8)
    ap.add_argument(
        "--jaeger", action=argparse.BooleanOptionalAction, default=True, help="the Jaeger peers"
    )
    ap.add_argument(
        "--correlations", type=int, default=1_000_000, help="stall scan size (0: skip the scan)"
    )
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    args.mixes = [m for m in args.mix.split(",") if m]  # --mix '': none
    if unknown := sorted(set(args.mixes) - set(TEMPLATES)):
        ap.error(f"unknown mix {', '.join(unknown)}: use {', '.join(TEMPLATES)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(main_async(args))
    save(result)
    if "summary" in result:
        print(table(result["summary"]))
    print(f"loadavg before {result['loadavg_before']}, after {result['loadavg_after']}")
    print(f"full figures: {RESULTS / 'ingest.json'}")


if __name__ == "__main__":
    main()
