"""Prometheus metrics of the collector (process-wide, default registry).

``hoptrace_stalled_correlations`` and ``hoptrace_failed_correlations`` are labelled like the
alerts (``pipeline``, ``step``, ``cause``) so a Prometheus rule can route on them the way the
alerts route (``deploy/prometheus/hoptrace-rules.yml``). Only the stall-scan leader computes them;
every other replica exports no series at all (a replica that loses the lease drops its own), so
summing or taking the max over replicas never counts a stale value.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

SPANS_RECEIVED = Counter(
    "hoptrace_spans_received",
    "Spans received by the collector and taken (queued) or refused for good (dropped); spans "
    "refused for a retry are counted in hoptrace_spans_refused.",
    ["transport"],
)
SPANS_STORED = Counter("hoptrace_spans_stored", "Spans written to the span store (new rows).")
SPANS_DUPLICATE = Counter("hoptrace_spans_duplicate", "Spans already in the store (ignored).")
SPANS_DROPPED = Counter(
    "hoptrace_spans_dropped",
    "Spans not accepted for good, by reason (invalid, out_of_window, unauthenticated, too_large, "
    "undecodable).",
    ["reason"],
)
SPANS_REFUSED = Counter(
    "hoptrace_spans_refused",
    "Spans refused because the write queue was full (HTTP 503 / gRPC UNAVAILABLE with a retry "
    "delay): the sender retries them, so they are not drops.",
    ["transport"],
)
BATCH_SECONDS = Histogram(
    "hoptrace_write_batch_seconds",
    "Time to write one batch (COPY + insert + correlation update).",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
WRITE_ERRORS = Counter("hoptrace_write_errors", "Failed batch writes (retried).")
QUEUE_DEPTH = Gauge("hoptrace_queue_depth", "Spans waiting in the write queue.")
#: The labels of the stuck-correlation gauges, in order.
STUCK_LABELS = ("pipeline", "step", "cause")
STALLED = Gauge(
    "hoptrace_stalled_correlations",
    "Correlations currently stalled, by pipeline, step not done and cause (the firing alert's); "
    "exported by the stall-scan leader only.",
    STUCK_LABELS,
)
FAILED = Gauge(
    "hoptrace_failed_correlations",
    "Correlations currently failed, by pipeline, failed step and cause (the firing alert's); "
    "exported by the stall-scan leader only.",
    STUCK_LABELS,
)
SCAN_LEADER = Gauge(
    "hoptrace_stall_scan_leader", "1 while this collector holds the stall-scan lease, else 0."
)
KAFKA_SOURCE_RESTARTS = Counter(
    "hoptrace_kafka_source_restarts", "Times the Kafka span source died and was restarted."
)
ALERTS_FIRED = Counter("hoptrace_alerts_fired", "Alerts fired (stalled and failed correlations).")
ALERT_DELIVERIES = Counter(
    "hoptrace_alert_deliveries", "Alert delivery attempts by result.", ["result"]
)
SCAN_SECONDS = Histogram(
    "hoptrace_stall_scan_seconds",
    "Duration of one stall scan.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
RUNS_PARKED = Counter(
    "hoptrace_runs_parked",
    "Step runs of services hoptrace did not write, parked until their trace names a correlation.",
)
RUNS_DROPPED = Counter(
    "hoptrace_runs_dropped",
    "Parked step runs dropped: their trace never named a correlation in time.",
)


#: The label sets each stuck gauge exports now (to drop the ones that went away).
_stuck_series: dict[int, set[tuple[str, str, str]]] = {}


def set_stuck(gauge: Gauge, counts: dict[tuple[str, str, str], int]) -> None:
    """Make ``counts`` ((pipeline, step, cause) -> correlations) the gauge's whole content:
    new values are set before the series that went away are removed (a scrape in between sees
    no gap)."""
    for key, n in counts.items():
        gauge.labels(*key).set(n)
    for key in _stuck_series.get(id(gauge), set()) - counts.keys():
        gauge.remove(*key)
    _stuck_series[id(gauge)] = set(counts)


def clear_stuck() -> None:
    """No stuck-correlation series at all (this replica does not lead the scan)."""
    for gauge in (STALLED, FAILED):
        set_stuck(gauge, {})


def render() -> tuple[bytes, str]:
    """The exposition body and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
