"""Every benchmark script imports: the suite runs no benchmark, so a module one of them imports from
can move (``ingest.py`` split into ``ingest_*``) and leave a script that fails at its first line
(``make bench`` stops there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

#: Imports each module named on the command line (from the benchmarks folder, as the scripts
#: themselves run) and prints one line per failure.
_PROBE = """
import importlib, sys, traceback
sys.path.insert(0, sys.argv[1])
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
"""


def test_every_benchmark_module_imports() -> None:
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "scale_out" in names and "ingest" in names  # the folder is where this test looks
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(BENCHMARKS), *names],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", f"benchmark modules that do not import:\n{done.stdout}"
