"""OTLP fuzzing, the long run: a real ``hoptrace collector`` on free ports against its own fresh
database, fed random and mutated bodies over HTTP and gRPC (gzip ones single- and multi-member:
every member's spans must be stored), lying headers, then a stream of oversized and compressed
bodies while its RSS is sampled.

    .venv/bin/python benchmarks/fuzz_otlp.py [--http 16000] [--grpc 4000] [--memory 200]
        [--max-body BYTES] [--out FILE]

Prints the figures and writes ``benchmarks/results/fuzz_otlp.json`` (cases, answers by status,
crashes, hangs, 500s, multi-member bodies whose spans went missing, RSS before/peak/after). Exit 1
when any crash, hang, 500 or missing multi-member span was seen."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import uuid
from pathlib import Path

import otlp_fuzz as net  # benchmarks/
from common import create_database, drop_database, isolated_spec  # benchmarks/

from hoptrace.settings import PROJECT_ROOT, get_settings

ROOT = PROJECT_ROOT

RESULTS = ROOT / "benchmarks" / "results" / "fuzz_otlp.json"


async def main(http_cases: int, grpc_cases: int, memory_cases: int, seed: int) -> int:
    admin = get_settings().database_url
    name = f"hoptrace_fuzz_{uuid.uuid4().hex[:10]}"
    db_url = await create_database(admin, name)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = isolated_spec(Path(tmp), uuid.uuid4().hex[:8])
            col = net.CollectorProc(db_url, spec, Path(tmp))
            col.start()
            try:
                rep = await net.run(col, http_cases, grpc_cases, memory_cases, seed)
            finally:
                exit_code = col.stop()
    finally:
        await drop_database(admin, db_url)
    figures = {"seed": seed, "max_body_bytes": net.MAX_BODY, **rep.as_json()}
    figures["collector_exit_code"] = exit_code
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "by_kind"}, indent=2))
    print(f"wrote {RESULTS}")
    bad = (
        rep.crashed
        or rep.hangs
        or rep.server_errors
        or rep.multi_member_missing
        or not rep.canary_stored
    )
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http", type=int, default=16_000)
    p.add_argument("--grpc", type=int, default=4_000)
    p.add_argument("--memory", type=int, default=200)
    p.add_argument("--seed", type=int, default=20261127)
    p.add_argument("--max-body", type=int, default=net.MAX_BODY, help="collector size cap")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    net.MAX_BODY = a.max_body
    RESULTS = a.out
    sys.exit(asyncio.run(main(a.http, a.grpc, a.memory, a.seed)))
