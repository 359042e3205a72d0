"""Hop overhead of tracing: the same N records through one hop (purchase.created: a row write,
idempotency mark, effect check, next-event emit, offset commit) on the real Kafka + PostgreSQL,
with tracing off (OTEL_SDK_DISABLED), the stock OpenTelemetry setup a user would configure
without hoptrace (``stock``: the plain SDK, the contrib aiokafka + asyncpg instrumentations, a
BatchSpanProcessor and the OTLP exporter), hoptrace's (``on``: OTLP gRPC to a live receiver),
hoptrace's with its speed-ups off (``on_noaccel``: ``HOPTRACE_ACCEL=0``, every plain public path)
and hoptrace's with the collector endpoint unreachable. Each mode runs in its own worker subprocess; rounds alternate
the modes to spread drift.

The worker process is set up as `hoptrace worker` runs (uvloop, its GC tuning, 1 s offset
commits with span flush, its lanes per consumer and its producer linger; ``--setup plain`` for
asyncio with default GC and runtime options).
Throughput = N / wall time; CPU = the worker process's CPU time (all threads, incl. the span
export thread) over the same window; tracing CPU per hop = (CPU on - CPU off) / N.

    .venv/bin/python benchmarks/hop_overhead.py [--records 2000] [--rounds 2]

Writes benchmarks/results/hop_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent import futures
from pathlib import Path

from common import create_database, drop_database, isolated_spec  # benchmarks/

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hop_overhead.json"
MODES = ("off", "stock", "on", "on_noaccel", "on_unreachable")
EXTRA_MODES = ("on_null",)
#: ``stock``: what a user gets without hoptrace: the plain OpenTelemetry SDK (TracerProvider,
#: BaggageSpanProcessor, BatchSpanProcessor, the OTLP gRPC exporter) and the contrib aiokafka +
#: asyncpg instrumentations, so every statement and every receive and send has its span; the
#: hop's own work and its process span are the same.


# --------------------------------------------------------------------------------- worker side


def _stock_tracing(endpoint: str) -> None:
    """Tracing as a user sets it up without hoptrace (see ``stock`` above)."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.processor.baggage import ALLOW_ALL_BAGGAGE_KEYS, BaggageSpanProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "bench-worker"}))
    provider.add_span_processor(BaggageSpanProcessor(ALLOW_ALL_BAGGAGE_KEYS))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
    )
    trace.set_tracer_provider(provider)
    AIOKafkaInstrumentor().instrument(tracer_provider=provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)


async def worker(n: int) -> dict:
    """Consume n pre-produced records through one hop; report wall time and process CPU."""
    from hoptrace.instrumentation import (
        Emit,
        HopContext,
        HopOptions,
        HopRuntime,
        configure_tracing,
        export_stats,
        load_spec,
        shutdown_tracing,
    )

    mode = os.environ["BENCH_MODE"]
    stock = mode == "stock"
    if stock:
        _stock_tracing(os.environ["BENCH_OTLP_ENDPOINT"])
    elif mode == "on_null":  # spans made and batched, export is a no-op: SDK cost without OTLP
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        class Null(SpanExporter):
            def export(self, spans):  # noqa: ANN001
                return SpanExportResult.SUCCESS

        configure_tracing("bench-worker", exporter=Null())
    elif mode != "off":
        configure_tracing(
            "bench-worker", endpoint=os.environ["BENCH_OTLP_ENDPOINT"], protocol="grpc"
        )
    else:
        configure_tracing("bench-worker")  # OTEL_SDK_DISABLED=true: no-op
    spec = load_spec(os.environ["HOPTRACE_PIPELINE"])

    async def purchase(ctx: HopContext) -> Emit:
        await ctx.conn.execute(
            "INSERT INTO student_course_purchases (correlation_id, amount) VALUES ($1, $2)",
            ctx.correlation_id,
            ctx.envelope.payload["amount"],
        )
        return Emit("PURCHASE_CREATED", {"payment_id": ctx.correlation_id})

    as_worker = os.environ.get("BENCH_SETUP", "worker") == "worker"
    opts: dict = {}
    if stock:  # every span the stock instrumentations make
        opts.update(receive_spans=True, send_spans=True, trace_bookkeeping=True)
    producer = None
    if as_worker:  # the runtime settings `hoptrace worker` uses
        from hoptrace.instrumentation import HopProducer
        from hoptrace.workers.run import COMMIT_INTERVAL_S, LINGER_MS, MAX_LANES

        producer = HopProducer(os.environ["HOPTRACE_KAFKA_BOOTSTRAP"], linger_ms=LINGER_MS)
        opts.update(commit_interval_s=COMMIT_INTERVAL_S, max_lanes=MAX_LANES)
    rt = HopRuntime(
        spec,
        "purchase.created",
        purchase,
        HopOptions(
            bootstrap=os.environ["HOPTRACE_KAFKA_BOOTSTRAP"],
            database_url=os.environ["HOPTRACE_DATABASE_URL"],
            handle_signals=False,
            **opts,
        ),
        producer=producer,
    )
    task = asyncio.create_task(rt.run())
    await rt.ready.wait()
    if as_worker:  # as `hoptrace worker` does once it is up
        from hoptrace.workers.run import _tune_gc

        _tune_gc()
    # the clock starts at the first processed record (excludes group join / first fetch)
    while rt.stats["ok"] == 0:  # noqa: ASYNC110 - polling a counter, not an event
        await asyncio.sleep(0.0005)
    profile_to = os.environ.get("BENCH_PROFILE")
    if profile_to:  # cProfile of the event loop thread over the measured window
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    gc_time = _gc_timer()
    w0, c0, done0 = time.perf_counter(), time.process_time(), rt.stats["ok"]
    while rt.stats["ok"] < n:  # noqa: ASYNC110
        if task.done():
            task.result()
            raise RuntimeError("runtime stopped early")
        await asyncio.sleep(0.002)
    w1, c1, done1 = time.perf_counter(), time.process_time(), rt.stats["ok"]
    gc_s = gc_time()
    if profile_to:
        prof.disable()
        prof.dump_stats(f"{profile_to}.{mode}")
    await rt.stop()
    await task
    if producer is not None:
        await producer.stop()
    hop_export = export_stats()  # before the calibration spans
    calib = _span_calibration() if mode != "off" else None
    t0 = time.perf_counter()
    shutdown_tracing(timeout_s=2.0)
    if stock:  # the stock provider flushes its batch processor
        from opentelemetry import trace

        trace.get_tracer_provider().shutdown()  # type: ignore[attr-defined]
    hops = done1 - done0
    return {
        "mode": mode,
        "hops": hops,
        "wall_s": w1 - w0,
        "cpu_s": c1 - c0,
        "throughput_per_s": hops / (w1 - w0),
        "cpu_us_per_hop": (c1 - c0) / hops * 1e6,
        "shutdown_s": time.perf_counter() - t0,
        "gc_us_per_hop": gc_s / hops * 1e6,
        "stats": rt.stats,
        "sdk_span_cpu_us": calib,
        "export": hop_export,
    }


def _gc_timer():  # noqa: ANN202
    """Start timing the garbage collector; the returned function stops and gives seconds."""
    import gc

    spent = [0.0, 0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            spent[1] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - spent[1]

    gc.callbacks.append(callback)

    def stop() -> float:
        gc.callbacks.remove(callback)
        return spent[0]

    return stop


def _span_calibration(n: int = 2000) -> float:
    """CPU of one bare SDK span (6 attributes, baggage, this process's exporter): the unit that
    the per-hop tracing cost is made of, on this machine, right now."""
    from opentelemetry.trace import SpanKind

    from hoptrace.instrumentation import correlation_context
    from hoptrace.instrumentation.tracing import get_tracer

    tracer = get_tracer()
    attrs = {f"calib.{i}": f"value-{i}" for i in range(6)}
    c0 = time.process_time()
    with correlation_context("calibration"):
        for _ in range(n):
            with tracer.start_as_current_span("calibration", kind=SpanKind.INTERNAL) as span:
                span.set_attributes(attrs)
    return (time.process_time() - c0) / n * 1e6


# --------------------------------------------------------------------------------- driver side


class _Receiver:
    """A live OTLP/gRPC receiver (in the driver process, so its CPU is not the worker's)."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans = 0
        outer = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802
                outer.spans += sum(
                    len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
                )
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _prepare(admin_url: str, bootstrap: str, tmp: Path, n: int) -> dict:
    """A database with the table, a spec with its own topics, n records waiting in the topic."""
    import asyncpg
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from hoptrace.contract.conventions import CORRELATION_HEADER
    from hoptrace.instrumentation import Envelope, HopProducer, load_spec

    suffix = uuid.uuid4().hex[:8]
    db_url = await create_database(admin_url, f"hoptrace_bench_{suffix}")
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "CREATE TABLE student_course_purchases (correlation_id text PRIMARY KEY, amount int)"
        )
    finally:
        await conn.close()
    spec_path = isolated_spec(tmp, f"bench-{suffix}")
    spec = load_spec(spec_path)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=spec.partitions, replication_factor=1) for t in spec.topics]
        )
    finally:
        await admin.close()
    topic = spec.step("payment.confirmed").emits
    async with HopProducer(bootstrap, linger_ms=5) as producer:
        raw = producer._producer
        batch = []
        for i in range(n):
            cid = f"bench-{suffix}-{i}"
            env = Envelope.new("PURCHASE_CONFIRMED", 1, cid, {"payment_id": cid, "amount": i})
            batch.append(
                await raw.send(
                    topic,
                    env.to_bytes(),
                    key=cid.encode(),
                    headers=[(CORRELATION_HEADER, cid.encode())],
                )
            )
        await asyncio.gather(*batch)
    return {"db_url": db_url, "spec": str(spec_path), "topics": spec.topics}


async def _cleanup(admin_url: str, bootstrap: str, prepared: dict) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    await drop_database(admin_url, prepared["db_url"])
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(prepared["topics"])
    finally:
        await admin.close()


def _run_mode(mode: str, n: int, prepared: dict, bootstrap: str, receiver_port: int) -> dict:
    env = {
        **os.environ,
        "BENCH_MODE": mode,
        "HOPTRACE_DATABASE_URL": prepared["db_url"],
        "HOPTRACE_KAFKA_BOOTSTRAP": bootstrap,
        "HOPTRACE_PIPELINE": prepared["spec"],
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
    }
    env.pop("OTEL_SDK_DISABLED", None)
    if mode == "off":
        env["OTEL_SDK_DISABLED"] = "true"
    elif mode in ("on", "on_noaccel", "stock"):
        env["BENCH_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver_port}"
        # stock: no hoptrace speed-up either (they are the instrumentation's); on_noaccel:
        # hoptrace with its speed-ups switched off, the plain public path of each
        env["HOPTRACE_ACCEL"] = "0" if mode in ("stock", "on_noaccel") else "1"
    else:
        env["BENCH_OTLP_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    out = subprocess.run(
        [sys.executable, __file__, "--worker", "--records", str(n)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker ({mode}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES), help="off,on,on_unreachable[,on_null]")
    parser.add_argument(
        "--profile", help="write each worker's cProfile stats to PROFILE.<mode> (not for figures)"
    )
    parser.add_argument(
        "--setup",
        choices=("worker", "plain"),
        default="worker",
        help="worker: the process set up as `hoptrace worker` runs (uvloop, tuned GC, 1 s "
        "commit interval, its lanes and producer linger); plain: asyncio loop, default GC and "
        "runtime options",
    )
    args = parser.parse_args()
    os.environ.setdefault("BENCH_SETUP", args.setup)
    if args.profile:
        os.environ["BENCH_PROFILE"] = os.path.abspath(args.profile)
    if args.worker:
        if os.environ.get("BENCH_SETUP", "worker") == "worker":
            from hoptrace.workers.run import _run  # uvloop when installed, as the workers

            print(json.dumps(_run(worker(args.records))))
        else:
            print(json.dumps(asyncio.run(worker(args.records))))
        return

    from hoptrace import devstack

    modes = [m for m in args.modes.split(",") if m]
    assert "off" in modes and set(modes) <= set(MODES + EXTRA_MODES), modes
    cfg = devstack.StackConfig.from_env()
    admin_url, bootstrap = cfg.database_url, cfg.kafka_bootstrap
    receiver = _Receiver()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for mode in modes:
                prepared = asyncio.run(_prepare(admin_url, bootstrap, Path(tmp), args.records))
                received = receiver.spans
                try:
                    res = _run_mode(mode, args.records, prepared, bootstrap, receiver.port)
                finally:
                    asyncio.run(_cleanup(admin_url, bootstrap, prepared))
                res["round"] = rnd
                res["spans_received"] = receiver.spans - received
                runs.append(res)
                print(
                    f"round {rnd} {mode:15s} {res['throughput_per_s']:8.1f} hops/s "
                    f"{res['cpu_us_per_hop']:8.1f} us CPU/hop  exported={res['export']['exported']} "
                    f"dropped={res['export']['dropped']} export thread "
                    f"{res['export'].get('export_cpu_us', 0) / max(1, res['hops']):.0f} us/hop, "
                    f"GC {res['gc_us_per_hop']:.0f} us/hop",
                    flush=True,
                )
    receiver.server.stop(grace=None)

    def total(mode: str) -> dict:
        rs = [r for r in runs if r["mode"] == mode]
        hops = sum(r["hops"] for r in rs)
        wall = sum(r["wall_s"] for r in rs)
        cpu = sum(r["cpu_s"] for r in rs)
        return {"hops": hops, "throughput_per_s": hops / wall, "cpu_us_per_hop": cpu / hops * 1e6}

    agg = {m: total(m) for m in modes}
    off = agg["off"]
    compare = {}
    for m in modes:
        if m == "off":
            continue
        paired = []
        for rnd in range(args.rounds):
            a = next(r for r in runs if r["mode"] == m and r["round"] == rnd)
            b = next(r for r in runs if r["mode"] == "off" and r["round"] == rnd)
            paired.append(
                {
                    "throughput_ratio": a["throughput_per_s"] / b["throughput_per_s"],
                    "tracing_cpu_us_per_hop": a["cpu_us_per_hop"] - b["cpu_us_per_hop"],
                }
            )
        compare[m] = {
            "throughput_ratio": agg[m]["throughput_per_s"] / off["throughput_per_s"],
            "tracing_cpu_us_per_hop": agg[m]["cpu_us_per_hop"] - off["cpu_us_per_hop"],
            "median_round_throughput_ratio": statistics.median(
                p["throughput_ratio"] for p in paired
            ),
            "median_round_tracing_cpu_us_per_hop": statistics.median(
                p["tracing_cpu_us_per_hop"] for p in paired
            ),
            "spans_per_hop": runs_spans(runs, m),
            "sdk_span_cpu_us_median": statistics.median(
                r["sdk_span_cpu_us"] for r in runs if r["mode"] == m
            ),
        }
    if "stock" in compare:
        stock_cpu = compare["stock"]["median_round_tracing_cpu_us_per_hop"]
        for m in ("on", "on_noaccel"):
            if m in compare:
                compare[m]["vs_stock_tracing_cpu"] = (
                    compare[m]["median_round_tracing_cpu_us_per_hop"] / stock_cpu
                    if stock_cpu
                    else None
                )
    summary = {
        "setup": args.setup,
        "records_per_run": args.records,
        "rounds": args.rounds,
        "load_average_1m_at_end": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "modes": agg,
        "vs_off": compare,
        "spans_received": receiver.spans,
        "goal": {
            "throughput_ratio": 0.95,
            "tracing_cpu_us_per_hop": 100,
            "vs_stock_tracing_cpu": 0.6,
        },
        "bar": {"throughput_ratio": 0.90, "tracing_cpu_us_per_hop": 150},
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    for m, v in compare.items():
        print(
            f"{m:15s} vs off: throughput ratio {v['throughput_ratio']:.3f} "
            f"(median of rounds {v['median_round_throughput_ratio']:.3f}); tracing CPU/hop "
            f"{v['tracing_cpu_us_per_hop']:.0f} us (median {v['median_round_tracing_cpu_us_per_hop']:.0f} us); "
            f"{v['spans_per_hop']:.1f} spans/hop; one bare SDK span here: "
            f"{v['sdk_span_cpu_us_median']:.0f} us"
        )
    for m in ("on", "on_noaccel"):
        if compare.get(m, {}).get("vs_stock_tracing_cpu") is not None:
            print(
                f"hoptrace ({m}) vs the stock setup: tracing CPU per hop x"
                f"{compare[m]['vs_stock_tracing_cpu']:.2f} (goal <= 0.6)"
            )
    print(
        f"spans received by the live receiver: {receiver.spans}; load average "
        f"{summary['load_average_1m_at_end']:.1f} on {summary['cpus']} CPUs -> "
        f"{RESULTS.relative_to(ROOT)}"
    )


def runs_spans(runs: list[dict], mode: str) -> float:
    """Spans per hop: what the process ended (hoptrace's counters), else what the receiver got
    (the stock setup has no counters; its runs' receive, send and bookkeeping spans included)."""
    rs = [r for r in runs if r["mode"] == mode]
    ended = sum(r["export"]["ended"] for r in rs) or sum(r.get("spans_received", 0) for r in rs)
    return ended / max(1, sum(r["hops"] for r in rs))


if __name__ == "__main__":
    main()
