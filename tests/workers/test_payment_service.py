"""payment-service and admin-service as clients meet them: an ``Idempotency-Key`` makes a
client's retry return the first payment (one row, one event, even when the retries race);
request bodies are capped (413, the service stays up); and the outbox relay backs off while
its rows keep failing, then sends them once Kafka is back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import httpx
import pytest

from hoptrace.contract import load_spec
from hoptrace.instrumentation.envelope import Envelope
from hoptrace.workers.payment_service import PaymentService
from hoptrace.workers.schema import migrate
from tests.support import wait_for

from .conftest import Pipeline
from .harness import count, fetchval, read_topic


def _pay_url(running: Pipeline) -> str:
    return f"http://127.0.0.1:{running.env['HOPTRACE_PAYMENT_SERVICE_PORT']}"


BODY = {"student": "student-3", "course": "course-2", "amount": "42.00"}


async def test_a_retry_with_the_same_idempotency_key_returns_the_first_payment(
    running: Pipeline,
) -> None:
    key = f"retry-{id(running)}-{asyncio.get_running_loop().time()}"
    async with httpx.AsyncClient(base_url=_pay_url(running), timeout=15) as client:
        first = await client.post("/payments", json=BODY, headers={"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        # the client did not see the answer and retries, several times at once
        again = await asyncio.gather(
            *(
                client.post("/payments", json=BODY, headers={"Idempotency-Key": key})
                for _ in range(5)
            )
        )
        other = await client.post("/payments", json=BODY)  # no key: a new payment
    cid = first.json()["payment_id"]
    assert {r.status_code for r in again} == {201}
    assert {r.json()["payment_id"] for r in again} == {cid}
    assert other.json()["payment_id"] != cid
    assert await count(running.db_url, "payments", cid) == 1
    assert (
        await fetchval(
            running.db_url, "SELECT count(*) FROM payment_outbox WHERE correlation_id = $1", cid
        )
        == 1
    )

    async def done() -> int:
        return await count(running.db_url, "tutoring_sessions", cid)

    await wait_for(done, timeout=30, what="the payment through the pipeline")
    topic = running.spec.step("payment.confirmed").emits
    events = {
        json.loads(r.value)["event_id"]
        for r in await read_topic(running.bootstrap, topic)
        if json.loads(r.value).get("correlation_id") == cid
    }
    assert len(events) == 1  # one event, however many retries


async def test_an_idempotency_key_reused_for_another_payment_is_refused(
    running: Pipeline,
) -> None:
    key = f"reuse-{asyncio.get_running_loop().time()}"
    async with httpx.AsyncClient(base_url=_pay_url(running), timeout=15) as client:
        first = await client.post("/payments", json=BODY, headers={"Idempotency-Key": key})
        assert first.status_code == 201
        changed = {**BODY, "amount": "43.00"}
        resp = await client.post("/payments", json=changed, headers={"Idempotency-Key": key})
        assert resp.status_code == 422 and "Idempotency-Key" in resp.json()["error"]
        for bad in ("", "x" * 300, "tab\tkey"):
            resp = await client.post("/payments", json=BODY, headers={"Idempotency-Key": bad})
            assert resp.status_code == 422, bad
            assert resp.json()["field"] == "Idempotency-Key"


@pytest.mark.parametrize("service", ["payment-service", "admin-service"])
async def test_request_bodies_are_capped(running: Pipeline, service: str) -> None:
    port = running.env[
        "HOPTRACE_PAYMENT_SERVICE_PORT"
        if service == "payment-service"
        else "HOPTRACE_ADMIN_SERVICE_PORT"
    ]
    path = "/payments" if service == "payment-service" else "/allocations"
    big = b'{"student": "' + b"x" * (4 * 1024 * 1024) + b'"}'

    async def chunks():  # no Content-Length: the cap must hold while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        resp = await client.post(path, content=big, headers={"content-type": "application/json"})
        assert resp.status_code == 413, resp.text
        assert "byte limit" in resp.json()["error"]
        resp = await client.post(
            path, content=chunks(), headers={"content-type": "application/json"}
        )
        assert resp.status_code == 413, resp.text
        assert (await client.get("/healthz")).status_code == 200
    assert running.services.procs[service].poll() is None


class _DownProducer:
    """A producer whose every emit fails (Kafka unreachable) until ``up`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.up = False
        self.sent: list[str] = []

    async def emit(self, topic: str, envelope: Envelope, **_kw: object) -> None:
        self.calls += 1
        if not self.up:
            from aiokafka.errors import KafkaConnectionError

            raise KafkaConnectionError("broker down")
        self.sent.append(envelope.correlation_id)


async def test_the_outbox_relay_backs_off_while_rows_keep_failing(
    db_url: str, spec_path: Path
) -> None:
    """Before: 600 unsent rows whose emits all failed were retried in a tight loop (a full
    batch of 500 made the relay go again at once), hammering Kafka and PostgreSQL."""
    await migrate(db_url)
    spec = load_spec(spec_path)
    topic = spec.step("payment.confirmed").emits
    conn = await asyncpg.connect(db_url)
    try:
        await conn.executemany(
            "INSERT INTO payment_outbox (correlation_id, topic, event) VALUES ($1, $2, $3)",
            [
                (f"ob-{i}", topic, Envelope.new("PURCHASE_CONFIRMED", 1, f"ob-{i}", {}).to_bytes())
                for i in range(600)
            ],
        )
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    producer = _DownProducer()
    service = PaymentService(spec, pool, producer)  # type: ignore[arg-type]
    relay = asyncio.create_task(service.relay())
    try:
        await asyncio.sleep(3.0)  # the measurement window: Kafka stays down for 3 s
        passes = producer.calls / 500
        assert passes <= 6, f"{producer.calls} emits in 3 s: no backoff"
        producer.up = True
        service._wake.set()

        async def all_sent() -> bool:
            return (
                await fetchval(db_url, "SELECT count(*) FROM payment_outbox WHERE sent_at IS NULL")
                == 0
            )

        await wait_for(all_sent, timeout=30, what="the rows sent once Kafka is back")
        assert len(set(producer.sent)) == 600
    finally:
        service.stop()
        await asyncio.wait_for(relay, 30)
        await pool.close()


def test_a_relayed_payment_is_marked_sent_only_once_its_step_span_is_exported(
    db_url: str, kafka_bootstrap: str, spec_path: Path, tmp_path: Path
) -> None:
    """Found by the chaos run (payment-service SIGKILLed): the relay marked a row sent right
    after Kafka acknowledged its event, while the ``payment.confirmed`` span still waited in the
    SDK's queue; a kill then lost the span for good (the row is never re-sent): the payment's
    diagnosis said ``consumed_without_trace``. Now a pass exports its spans before marking its
    rows sent (a kill before that re-sends the row: a copy of the same event, and its span).
    A collector that takes 1 s per export shows the order (not longer: the relay's flush waits
    for an export already in flight, e.g. the request's spans, then its own, within
    ``RELAY_FLUSH_S`` = 5 s; past that it marks the rows anyway, by design. At 3 s per export
    that happened under the full suite's load)."""
    import subprocess
    import time

    from .harness import HOPTRACE, OtlpReceiver, Services, service_env

    otlp = OtlpReceiver(delay_s=1.0)
    env = service_env(db_url, kafka_bootstrap, spec_path, otlp)
    res = subprocess.run([HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    services = Services(env, tmp_path)
    try:
        services.start("payment-service")
        pay = subprocess.run(
            [HOPTRACE, "pay"], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        cid = pay.stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 30
        while True:
            sent = asyncio.run(
                fetchval(
                    db_url,
                    "SELECT sent_at IS NOT NULL FROM payment_outbox WHERE correlation_id = $1",
                    cid,
                )
            )
            if sent:
                break
            assert time.monotonic() < deadline, "the row was never sent"
            time.sleep(0.05)
        names = {s.name for s in otlp.for_correlation(cid)}
        assert "payment.confirmed" in names, names  # exported before the row was marked sent
    finally:
        services.stop_all()
        otlp.close()
        from hoptrace.contract import load_spec
        from tests.support import delete_topics

        asyncio.run(delete_topics(kafka_bootstrap, load_spec(spec_path).topics))


def test_a_payment_relayed_while_the_collector_is_down_keeps_its_span_across_a_kill(
    db_url: str, kafka_bootstrap: str, spec_path: Path, tmp_path: Path
) -> None:
    """Found by the full chaos run (402 payments ``consumed_without_trace`` at payment.confirmed):
    with the collector down, a relay pass gave up waiting for its spans after ``RELAY_FLUSH_S``
    and marked its rows sent anyway; payment-service SIGKILLed before the collector came back
    lost those spans for good (the rows are never re-sent). Now a row is marked sent only once
    its span is exported: the pass keeps it unsent without sending it again (one copy on Kafka
    while the collector is down), and a kill re-sends it, with its span, at the next start."""
    import subprocess
    import time

    from .harness import HOPTRACE, OtlpReceiver, Services, service_env

    down = OtlpReceiver()
    port = down.port
    down.close()  # the collector's address, nothing listening: every export fails
    env = service_env(db_url, kafka_bootstrap, spec_path, down)
    res = subprocess.run([HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    topic = load_spec(spec_path).step("payment.confirmed").emits
    assert topic is not None
    services = Services(env, tmp_path)
    otlp: OtlpReceiver | None = None
    try:
        services.start("payment-service")
        pay = subprocess.run(
            [HOPTRACE, "pay"], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        cid = pay.stdout.strip().splitlines()[-1]
        log = services.log("payment-service")
        deadline = time.monotonic() + 60
        while log.read_text(errors="replace").count("step spans not exported yet") < 2:
            assert time.monotonic() < deadline, services.tail("payment-service")
            time.sleep(0.1)
        records = [
            r for r in asyncio.run(read_topic(kafka_bootstrap, topic)) if r.key == cid.encode()
        ]
        assert len(records) == 1, records  # two passes gave up on the span; the event went once
        services.kill("payment-service")
        otlp = OtlpReceiver(port=port)  # the collector is back
        services.start("payment-service")
        deadline = time.monotonic() + 30
        while "payment.confirmed" not in {s.name for s in otlp.for_correlation(cid)}:
            assert time.monotonic() < deadline, (
                f"the payment's step span was lost: {services.tail('payment-service')}"
            )
            time.sleep(0.1)
        records = [
            r for r in asyncio.run(read_topic(kafka_bootstrap, topic)) if r.key == cid.encode()
        ]
        ids = {Envelope.parse(r.value).event_id for r in records}
        assert len(records) == 2 and len(ids) == 1, records  # a copy of the same event
    finally:
        services.stop_all()
        if otlp is not None:
            otlp.close()
        from tests.support import delete_topics

        asyncio.run(delete_topics(kafka_bootstrap, load_spec(spec_path).topics))


async def test_sent_outbox_rows_are_purged_by_retention_unsent_never(db_url: str) -> None:
    from datetime import timedelta

    from hoptrace.workers.payment_service import OUTBOX_PURGE_BATCH, purge_sent

    await migrate(db_url)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        await pool.executemany(
            "INSERT INTO payment_outbox (correlation_id, topic, event, sent_at, created_at)"
            " VALUES ($1, 't', '\\x00', now() - $2::interval, now() - $3::interval)",
            [
                *[
                    (f"old-{i}", timedelta(days=9), timedelta(days=9))
                    for i in range(OUTBOX_PURGE_BATCH + 2)
                ],
                ("recent", timedelta(days=1), timedelta(days=1)),
            ],
        )
        await pool.execute(
            "INSERT INTO payment_outbox (correlation_id, topic, event, created_at)"
            " VALUES ('unsent-old', 't', '\\x00', now() - interval '30 days')"
        )
        assert await purge_sent(pool, timedelta(days=7)) == OUTBOX_PURGE_BATCH + 2
        left = await pool.fetch("SELECT correlation_id FROM payment_outbox ORDER BY 1")
        assert [r["correlation_id"] for r in left] == ["recent", "unsent-old"]
    finally:
        await pool.close()
