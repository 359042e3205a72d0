"""How the reference services are tuned: consumers, lanes, commit interval, producer linger and
garbage collection (measured with ``benchmarks/hop_overhead.py`` and
``benchmarks/pipeline_e2e.py``)."""

from __future__ import annotations

#: Kafka consumers per worker process: one consumer handles its partitions concurrently.
DEFAULT_CONSUMERS = 1
#: Offsets are committed (after the spans of the records handled are exported) this often: each
#: commit forces a span export, so a short interval costs CPU; a kill redelivers at most this
#: much (a duplicate, never a second row).
COMMIT_INTERVAL_S = 1.0
#: Allocations (minus deallocations) of container objects between young-generation collections
#: (Python's default is 700).
GC_GEN0_THRESHOLD = 20_000
#: Records handled at once per consumer (by key: one correlation's records stay in order).
MAX_LANES = 16
#: Emits of concurrent records wait this long to share one produce request.
LINGER_MS = 2
#: A worker not assigned partitions after this long checks whether its topic exists.
READY_CHECK_S = 3.0
