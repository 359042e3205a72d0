"""Events, migrations and `topics ensure` on their own (no services running)."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import pytest

from hoptrace.contract import load_spec
from hoptrace.instrumentation.envelope import Envelope, PoisonRecord
from hoptrace.workers.events import (
    PURCHASE_CONFIRMED,
    PURCHASE_CREATED,
    PurchaseConfirmedV1,
    new_event,
    payload_of,
    validator,
)
from hoptrace.workers.schema import MIGRATIONS, migrate
from tests.support import delete_topics

from .harness import HOPTRACE


def _confirmed() -> Envelope:
    payload = PurchaseConfirmedV1(
        payment_id="p-1", student="student-1", course="course-1", amount="9.50"
    )
    return new_event(PURCHASE_CONFIRMED, "p-1", payload)


def test_event_round_trips_through_the_envelope() -> None:
    env = Envelope.parse(_confirmed().to_bytes())
    assert env.type == PURCHASE_CONFIRMED and env.version == 1 and env.correlation_id == "p-1"
    assert payload_of(env) == PurchaseConfirmedV1(
        payment_id="p-1", student="student-1", course="course-1", amount="9.50"
    )


@pytest.mark.parametrize(
    "change",
    [{"type": PURCHASE_CREATED}, {"version": 2}, {"payload": {"payment_id": "p-1"}}],
    ids=["wrong type", "unknown version", "bad payload"],
)
def test_validator_turns_mismatches_into_poison(change: dict) -> None:
    env = _confirmed().model_copy(update=change)
    with pytest.raises(PoisonRecord):
        validator(PURCHASE_CONFIRMED)(env)


def test_new_event_refuses_the_wrong_payload_model() -> None:
    with pytest.raises(TypeError):
        new_event(PURCHASE_CREATED, "p-1", _confirmed_payload())


def _confirmed_payload() -> PurchaseConfirmedV1:
    return PurchaseConfirmedV1(payment_id="p", student="s", course="c", amount="1")


async def test_migrations_are_idempotent_and_safe_concurrently(db_url: str) -> None:
    results = await asyncio.gather(migrate(db_url), migrate(db_url), migrate(db_url))
    assert sorted(v for r in results for v in r) == [v for v, _, _ in MIGRATIONS]
    assert await migrate(db_url) == []
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM students") == 100
        assert await conn.fetchval("SELECT count(*) FROM courses") == 20
        await conn.execute(
            "INSERT INTO trainer_allocations (correlation_id, student, course, trainer)"
            " VALUES ('c1', 's', 'c', 't')"
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO trainer_allocations (correlation_id, student, course, trainer)"
                " VALUES ('c1', 's', 'c', 't2')"
            )
        assert await conn.fetchval("SELECT to_regclass('processed_events') IS NOT NULL")
    finally:
        await conn.close()


def _ensure(env: dict[str, str]) -> dict[str, str]:
    res = subprocess.run([HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return dict(line.split()[:2] for line in res.stdout.splitlines() if line.strip())


def test_topics_ensure_creates_every_topic_once(
    hoptrace_env: dict[str, str], spec_path, kafka_bootstrap: str
) -> None:
    spec = load_spec(spec_path)
    try:
        first = _ensure(hoptrace_env)
        assert first == {t: "created" for t in spec.topics} and len(first) == 6
        assert any(t.endswith(".dlq") for t in first)
        assert _ensure(hoptrace_env) == {t: "exists" for t in spec.topics}
    finally:
        asyncio.run(delete_topics(kafka_bootstrap, spec.topics))


def test_topics_ensure_says_when_kafka_is_unreachable(hoptrace_env: dict[str, str]) -> None:
    from ..support import free_port

    env = {**hoptrace_env, "HOPTRACE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    res = subprocess.run(
        [HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "cannot reach Kafka" in res.stderr


def test_worker_refuses_an_unknown_fault(hoptrace_env: dict[str, str]) -> None:
    res = subprocess.run(
        [HOPTRACE, "worker", "session-worker", "--fault", "no-verify"],
        env=hoptrace_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "allowed: crash-after-write" in res.stderr


async def test_worker_started_before_its_topic_waits_for_it(
    hoptrace_env: dict[str, str], db_url: str, spec_path, kafka_bootstrap: str, tmp_path
) -> None:
    from tests.support import wait_for

    from .harness import Services, count, produce, service_env

    spec = load_spec(spec_path)
    env = {**service_env(db_url, kafka_bootstrap, spec_path, None), **{"HOPTRACE_FAULT": ""}}
    services = Services(env, tmp_path)
    try:
        await asyncio.to_thread(services.start, "purchase-worker")
        assert "does not exist" in services.tail("purchase-worker", 50)
        await asyncio.to_thread(_ensure, env)
        event = _confirmed()
        await produce(kafka_bootstrap, spec.step("purchase.created").consumes, event.to_bytes())
        await wait_for(
            lambda: count(db_url, "student_course_purchases", "p-1"), timeout=30, what="purchase"
        )
    finally:
        services.stop_all()
        await delete_topics(kafka_bootstrap, spec.topics)


# --------------------------------------------------------------------- the allocation handler


class _AdminStub:
    """admin-service as the Allocator sees it: answers each POST with ``status`` and ``body``."""

    def __init__(self, status: int, body: dict) -> None:
        self.status, self.body = status, body
        self.posts: list[dict] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import json

        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.posts.append(json.loads(await reader.readexactly(length)))
                data = json.dumps(self.body).encode()
                writer.write(
                    f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        finally:
            writer.close()


def _allocation_ctx():  # noqa: ANN202 - a HopContext for the allocation step (no DB)
    from opentelemetry.trace import INVALID_SPAN

    from hoptrace.instrumentation.hop import HopContext, RecordInfo
    from hoptrace.workers.events import PurchaseCreatedV1

    from ..support import REFERENCE_SPEC

    spec = load_spec(REFERENCE_SPEC)
    payload = PurchaseCreatedV1(payment_id="p-1", purchase_id=1, student="s-1", course="c-1")
    return HopContext(
        new_event(PURCHASE_CREATED, "p-1", payload),
        "p-1",
        RecordInfo("t", 0, 0, "g"),
        None,  # type: ignore[arg-type]
        INVALID_SPAN,
        spec.step("trainer.allocated"),
        spec,
    )


async def _allocate(status: int, body: dict) -> tuple[object, list[dict]]:
    """The Allocator's handler against a stub answering ``status``/``body``: (its return value
    or the exception it raised, what the stub received)."""
    from hoptrace.workers.allocation_worker import Allocator

    stub = _AdminStub(status, body)
    server = await asyncio.start_server(stub.handle, "127.0.0.1", 0)
    allocator = Allocator(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout_s=2)
    try:
        try:
            return await allocator.handle(_allocation_ctx()), stub.posts
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            return exc, stub.posts
    finally:
        await allocator.aclose()
        server.close()


async def test_allocator_posts_the_allocation_and_emits_trainer_allocated() -> None:
    from hoptrace.workers.events import TRAINER_ALLOCATED

    emitted, posts = await _allocate(200, {"trainer": "t-7"})
    assert posts == [{"correlation_id": "p-1", "student": "s-1", "course": "c-1"}]
    assert emitted.type == TRAINER_ALLOCATED and emitted.payload["trainer"] == "t-7"


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (503, {"detail": "down"}, "retry"),
        (422, {"detail": "no such course"}, "poison"),
        (200, {}, "retry"),  # no trainer in the answer
    ],
    ids=["5xx", "4xx", "no trainer"],
)
async def test_allocator_failures(status: int, body: dict, kind: str) -> None:
    from hoptrace.instrumentation.envelope import RetryableError

    raised, _ = await _allocate(status, body)
    assert isinstance(raised, RetryableError if kind == "retry" else PoisonRecord), raised


async def test_allocator_unreachable_admin_service_is_a_retried_outage() -> None:
    from hoptrace.instrumentation.envelope import RetryableError
    from hoptrace.instrumentation.hop import is_outage
    from hoptrace.workers.allocation_worker import Allocator

    from ..support import free_port

    allocator = Allocator(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    try:
        with pytest.raises(RetryableError) as info:
            await allocator.handle(_allocation_ctx())
    finally:
        await allocator.aclose()
    assert is_outage(info.value)
