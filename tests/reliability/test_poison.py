"""Poison events on the real pipeline: a record that is not JSON, has a wrong schema version, has
no correlation id, or is huge goes to ``<topic>.dlq`` with a reason header; the worker keeps going
(a good record after them is processed) and ``hoptrace trace ID`` shows the dead letter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from benchmarks.otlp_fuzz import CollectorProc
from hoptrace.contract import PipelineSpec, load_spec
from hoptrace.instrumentation.envelope import MAX_RECORD_BYTES, Envelope
from hoptrace.workers.events import PURCHASE_CONFIRMED, PurchaseConfirmedV1, new_event
from tests.collector.helpers import request, step_span
from tests.support import wait_for
from tests.workers.harness import (
    HOPTRACE,
    Services,
    count,
    fetchval,
    read_topic,
    service_env,
)


@dataclass
class Rig:
    env: dict[str, str]
    spec: PipelineSpec
    bootstrap: str
    db_url: str
    services: Services
    collector: CollectorProc

    @property
    def topic(self) -> str:
        topic = self.spec.step("purchase.created").consumes
        assert topic
        return topic


@pytest.fixture
def rig(db_url: str, kafka_bootstrap: str, spec_path: Path, tmp_path: Path) -> Iterator[Rig]:
    """Topics (`hoptrace topics ensure`), a collector, and purchase-worker exporting to it."""
    collector = CollectorProc(db_url, spec_path, tmp_path)
    collector.start()
    env = service_env(db_url, kafka_bootstrap, spec_path, None)
    env.pop("OTEL_TRACES_EXPORTER")
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.http
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    res = subprocess.run([HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    services = Services(env, tmp_path)
    services.start("purchase-worker")
    spec = load_spec(spec_path)
    try:
        yield Rig(env, spec, kafka_bootstrap, db_url, services, collector)
    finally:
        services.stop_all()
        collector.stop()
        from tests.support import delete_topics

        asyncio.run(delete_topics(kafka_bootstrap, spec.topics))


def good_event(cid: str) -> Envelope:
    payload = PurchaseConfirmedV1(
        payment_id=cid, student="student-1", course="course-1", amount="10.00"
    )
    return new_event(PURCHASE_CONFIRMED, cid, payload)


async def produce(rig: Rig, records: list[tuple[bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=rig.bootstrap, max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        for value, headers in records:
            await producer.send_and_wait(rig.topic, value, key=b"k", headers=headers)
    finally:
        await producer.stop()


def hdr(cid: str) -> list[tuple[str, bytes]]:
    return [("x-correlation-id", cid.encode())]


async def test_poison_records_go_to_the_dlq_and_the_worker_keeps_going(rig: Rig) -> None:
    s = uuid.uuid4().hex[:8]
    ids = {k: f"poison-{k}-{s}" for k in ("nonjson", "version", "huge", "huger")}
    good = f"good-{s}"
    wrong_version = good_event(ids["version"]).model_copy(update={"version": 99})
    no_cid = good_event("x").model_dump(mode="json")
    no_cid["correlation_id"] = ""
    no_cid["payload"].pop("payment_id")
    huge = good_event(ids["huge"]).model_dump(mode="json")
    huge["payload"]["blob"] = "x" * (MAX_RECORD_BYTES + 1000)
    huger = good_event(ids["huger"]).model_dump(mode="json")
    huger["payload"]["blob"] = "y" * (3 * 1024 * 1024)  # over the DLQ producer's 1 MiB too
    # the poisoned payment's first step happened (as payment-service would write and report it)
    await fetchval(
        rig.db_url,
        "INSERT INTO payments (payment_id, correlation_id, student, course, amount, status) "
        "VALUES ($1, $1, 'student-1', 'course-1', 10, 'succeeded') RETURNING 1",
        ids["version"],
    )
    svc, span = step_span(ids["version"], 0)
    async with httpx.AsyncClient() as client:
        resp = await client.post(
            f"{rig.collector.http}/v1/traces",
            content=request([(svc, span)]).SerializeToString(),
            headers={"content-type": "application/x-protobuf"},
        )
        assert resp.status_code == 200
    await produce(
        rig,
        [
            (b"not json {", hdr(ids["nonjson"])),
            (wrong_version.to_bytes(), hdr(ids["version"])),
            (json.dumps(no_cid).encode(), []),
            (json.dumps(huge).encode(), hdr(ids["huge"])),
            (json.dumps(huger).encode(), hdr(ids["huger"])),
            (good_event(good).to_bytes(), hdr("x'; DROP TABLE payments; --")),
            (good_event(good).to_bytes(), hdr(good)),
        ],
    )
    # the worker kept going: the good record after the poison ones was processed
    await wait_for(
        lambda: count(rig.db_url, "student_course_purchases", good),
        timeout=30,
        what="the good record processed after the poison records",
    )
    dlq = rig.topic + ".dlq"

    async def dead_letters() -> list:
        recs = await read_topic(rig.bootstrap, dlq)
        return recs if len(recs) >= 6 else []

    recs = await wait_for(dead_letters, timeout=30, what="6 dead letters")
    reasons, truncated = {}, {}
    for r in recs:
        h = dict(r.headers)
        cid = h.get("x-correlation-id", b"").decode()
        reasons[cid] = h["x-dlq-reason"].decode()
        truncated[cid] = h.get("x-dlq-truncated-from")
        assert h["x-dlq-source-topic"].decode() == rig.topic
    assert reasons[ids["nonjson"]].startswith("not JSON"), reasons
    assert "v99" in reasons[ids["version"]], reasons
    assert "no correlation id" in reasons[""], reasons
    assert "over the" in reasons[ids["huge"]] and "limit" in reasons[ids["huge"]], reasons
    assert "over the" in reasons[ids["huger"]], reasons
    # regression: a record over the DLQ producer's request size was retried forever (the
    # worker wedged); now its head is parked with the original size in a header
    assert int(truncated[ids["huger"]]) == len(json.dumps(huger))
    assert truncated[ids["huge"]] is None  # under the producer's limit: parked whole
    # an id that is not in the correlation id format is refused at the Kafka entry point too
    assert reasons["x'; DROP TABLE payments; --"].startswith("invalid correlation id"), reasons
    for cid in ids.values():
        assert await count(rig.db_url, "student_course_purchases", cid) == 0
    assert rig.services.procs["purchase-worker"].poll() is None  # still running

    # the diagnosis shows the dead letter for a poisoned payment
    def trace(cid: str) -> dict:
        res = subprocess.run(
            [HOPTRACE, "trace", cid, "--format", "json"],
            env=rig.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    last: list[dict] = []

    async def diagnosed() -> dict | None:
        last[:] = [await asyncio.to_thread(trace, ids["version"])]
        return last[0] if last[0].get("cause") == "processing_error" else None

    try:
        d = await wait_for(diagnosed, timeout=30, interval=0.5, what="processing_error")
    except AssertionError:
        raise AssertionError(json.dumps(last, indent=1)[:3000]) from None
    assert d["stopped_at"] == "purchase.created"
    text = json.dumps(d)
    assert "dlq" in text and "v99" in text, text[:2000]
