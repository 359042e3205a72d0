"""OTLP decode benchmark: CPU per span of ``parse_protobuf`` + ``decode_request`` alone, on the
ingest benchmark's 512-span request (128 correlations x 4 step spans, 8 attributes each).

Optionally the same measurement for ``collector/decode.py`` at a git revision (``--baseline REV``),
in the same process and conditions, for a ratio. CPU time (``process_time``), best of ``--reps``.

Run: ``.venv/bin/python benchmarks/decode.py [--baseline 37c2f21]``. JSON goes to
``benchmarks/results/decode.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from ingest import build_template, fresh  # noqa: E402


def load_revision(rev: str) -> ModuleType:
    """``collector/decode.py`` as it was at git revision ``rev``, as a module."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:collector/decode.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "decode_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("decode_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["decode_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def measure(mod: ModuleType, bodies: list[bytes], reps: int) -> float:
    """Best CPU seconds per span over ``reps`` passes."""
    best = float("inf")
    for _ in range(reps):
        n = 0
        t0 = time.process_time()
        for body in bodies:
            n += len(mod.decode_request(mod.parse_protobuf(body), datetime.now(UTC)).rows)
        best = min(best, (time.process_time() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baseline", help="git revision of collector/decode.py to compare with")
    args = ap.parse_args()
    from hoptrace.collector import decode

    body, offsets = build_template()
    bodies = [fresh(body, offsets) for _ in range(args.requests)]
    out: dict[str, object] = {"spans_per_request": 512, "requests": args.requests}
    cur = measure(decode, bodies, args.reps)
    out["us_per_span"] = round(cur * 1e6, 2)
    out["spans_per_s_per_core"] = round(1 / cur)
    if args.baseline:
        base_mod = load_revision(args.baseline)
        now = datetime.now(UTC)
        for b in bodies[:5]:  # same rows from both
            assert (
                base_mod.decode_request(base_mod.parse_protobuf(b), now).rows
                == decode.decode_request(decode.parse_protobuf(b), now).rows
            )
        base = measure(base_mod, bodies, args.reps)
        cur = min(cur, measure(decode, bodies, args.reps))  # again, after: same conditions
        out["us_per_span"] = round(cur * 1e6, 2)
        out["spans_per_s_per_core"] = round(1 / cur)
        out["baseline"] = args.baseline
        out["baseline_us_per_span"] = round(base * 1e6, 2)
        out["baseline_spans_per_s_per_core"] = round(1 / base)
        out["speedup"] = round(base / cur, 2)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "decode.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
