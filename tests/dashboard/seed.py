"""Fill a per-test store through the collector's own write path: OTLP requests as the SDK sends
them -> ``decode_request`` -> ``Writer.write`` (COPY + correlation fold); then grant the
read-only dashboard role access to that database."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from hoptrace.collector import api
from hoptrace.collector.decode import I_STEP, decode_request
from hoptrace.collector.schema import migrate
from hoptrace.collector.stalls import CauseFn, StallScanner
from hoptrace.collector.writer import Writer, init_connection
from hoptrace.contract import PipelineSpec

from ..support import wait_for

RO_ROLE = "hoptrace_ro"


def _kv(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _ns(t: datetime) -> int:
    return int(t.timestamp() * 1e9)


@dataclass
class Seeded:
    """Ids of what was written, by kind."""

    completed: list[str] = field(default_factory=list)
    stalled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # stalled, alerted, then completed


class Payments:
    """Builds the spans of reference-pipeline payments (one trace each)."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.req = ExportTraceServiceRequest()
        self.offset = 0

    def payment(
        self,
        cid: str,
        start: datetime,
        done: int,
        failed_step: str | None = None,
        hop: float = 0.05,
    ) -> None:
        """Spans for the first ``done`` steps (ok), plus an error span on ``failed_step``."""
        trace_id = os.urandom(16)
        parent = b""
        t = start
        steps = list(self.spec.steps[:done])
        if failed_step:
            steps.append(self.spec.step(failed_step))
        for i, step in enumerate(steps):
            error = step.id == failed_step
            span_id = os.urandom(8)
            attrs = [
                _kv("hoptrace.correlation_id", cid),
                _kv("hoptrace.pipeline", self.spec.name),
                _kv("hoptrace.step", step.id),
                _kv("hoptrace.step.outcome", "error" if error else "ok"),
            ]
            if step.consumes:
                attrs += [
                    _kv("messaging.system", "kafka"),
                    _kv("messaging.destination.name", step.consumes),
                    _kv("messaging.destination.partition.id", "0"),
                    _kv("messaging.kafka.offset", self.offset),
                    _kv("messaging.consumer.group.name", step.group or ""),
                ]
            if step.emits and not error:
                self.offset += 1
                attrs += [
                    _kv("hoptrace.emit.topic", step.emits),
                    _kv("hoptrace.emit.partition", 0),
                    _kv("hoptrace.emit.offset", self.offset),
                ]
            end = t + timedelta(seconds=hop * (i + 1))
            span = Span(
                trace_id=trace_id,
                span_id=span_id,
                parent_span_id=parent,
                name=step.id,
                kind=Span.SPAN_KIND_CONSUMER if step.consumes else Span.SPAN_KIND_SERVER,
                start_time_unix_nano=_ns(t),
                end_time_unix_nano=_ns(end),
                attributes=attrs,
                status=Status(
                    code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_OK,
                    message="admin-service answered 500" if error else "",
                ),
            )
            rs = self.req.resource_spans.add()
            rs.resource.attributes.append(_kv("service.name", step.service))
            rs.scope_spans.add().spans.append(span)
            parent = span_id
            t = end + timedelta(milliseconds=5)


async def seed(
    db_url: str,
    spec: PipelineSpec,
    completed: int = 5,
    stalled: int = 2,
    failed: int = 1,
    in_progress: int = 1,
) -> Seeded:
    """Write payments in each state through the collector's write path; returns their ids."""
    now = datetime.now(UTC)
    out = Seeded()
    build = Payments(spec)
    for i in range(completed):
        cid = f"pay-done-{i:03d}"
        build.payment(
            cid, now - timedelta(minutes=5, seconds=i), done=len(spec.steps), hop=0.05 * (i + 1)
        )
        out.completed.append(cid)
    for i in range(stalled):
        cid = f"pay-stall-{i:03d}"
        # payment.confirmed and purchase.created done long ago: trainer.allocated is overdue.
        build.payment(cid, now - timedelta(minutes=10 + i), done=2)
        out.stalled.append(cid)
    for i in range(failed):
        cid = f"pay-fail-{i:03d}"
        build.payment(cid, now - timedelta(minutes=3), done=2, failed_step="trainer.allocated")
        out.failed.append(cid)
    for i in range(in_progress):
        cid = f"pay-live-{i:03d}"
        build.payment(cid, now - timedelta(seconds=1), done=1)
        out.in_progress.append(cid)
    # A payment that stalls at trainer.allocated, then completes after the stall scan.
    recovered = "pay-late-000"
    build.payment(recovered, now - timedelta(minutes=8), done=2)
    out.recovered.append(recovered)
    later_steps = {s.id for s in spec.steps[2:]}
    rows = decode_request(build.req, now).rows
    conn = await asyncpg.connect(db_url)
    try:
        await migrate(conn, timedelta(days=7))
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2, init=init_connection)
    try:
        await Writer(pool, spec, timedelta(days=7)).write(rows)
        await mark_stalled(db_url, pool)
        # One stalled payment then moves on: its alert resolves (the writer does that).
        late = Payments(spec)
        late.payment(recovered, now - timedelta(minutes=8), done=len(spec.steps))
        late_rows = [r for r in decode_request(late.req, now).rows if r[I_STEP] in later_steps]
        await Writer(pool, spec, timedelta(days=7)).write(late_rows)
        out.completed.append(recovered)
    finally:
        await pool.close()
    await grant_readonly(db_url)
    return out


async def mark_stalled(db_url: str, pool: asyncpg.Pool) -> None:
    """The collector's stall scan, once, with the diagnosis as the alerts' cause hook."""
    scanner = StallScanner(db_url, pool, cause_for=_cause_for())
    try:
        fired = await scanner.tick()
        assert fired, "the stall scan fired no alert"

        async def diagnosed() -> bool:
            return not await pool.fetchval("SELECT count(*) FROM alerts WHERE NOT diagnosed")

        await wait_for(diagnosed, timeout=30, what="alert causes")
    finally:
        await scanner.release()
        await api.close()  # the diagnosis clients the cause hook opened on this loop


def _cause_for() -> CauseFn:
    return api.cause_for


async def grant_readonly(db_url: str) -> None:
    """Let the dashboard's read-only role read this test database."""
    conn = await asyncpg.connect(db_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{name}" TO {RO_ROLE}')
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {RO_ROLE}")
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {RO_ROLE}")
    finally:
        await conn.close()
