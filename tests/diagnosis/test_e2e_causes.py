"""End to end, one test per cause: the reference services (`hoptrace worker NAME [--fault F]`)
export spans to the real collector (`hoptrace collector`), which stores them in this module's
database; each fault of the incident is switched on, a payment is made, and `hoptrace trace ID
--format json` must name the step where it stopped and the cause.

Deadlines are shortened (a few seconds) so overdue causes show up quickly."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from hoptrace.collector import api
from hoptrace.contract import PipelineSpec, load_spec
from hoptrace.settings import Settings
from tests.support import (
    create_database,
    delete_topics,
    drop_database,
    free_port,
    isolated_spec,
    unique,
)
from tests.workers.harness import HOPTRACE, Services, service_env

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(180)]

DEADLINE_S = 4


@dataclass
class Stack:
    db_url: str
    bootstrap: str
    spec_path: Path
    spec: PipelineSpec
    services: Services
    collector: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return self.services.env

    def pay(self) -> str:
        res = subprocess.run(
            [HOPTRACE, "pay"], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]

    def trace(self, cid: str) -> dict:
        res = subprocess.run(
            [HOPTRACE, "trace", cid, "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def settings(self) -> Settings:
        return Settings(
            database_url=self.db_url, kafka_bootstrap=self.bootstrap, pipeline=self.spec_path
        )

    async def wait_cause(
        self, cid: str, cause: str, timeout: float = 45.0, at: str | None = None
    ) -> object:
        """Poll the diagnosis (in process) until it names ``cause`` (at step ``at``)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = await api.diagnose(cid, settings=self.settings(), spec=self.spec)
            if last.cause == cause and (at is None or last.stopped_at == at):
                return last
            await asyncio.sleep(0.3)
        raise AssertionError(
            f"{cid}: cause {cause!r} not reached in {timeout}s; last: {last and last.cause} "
            f"at {last and last.stopped_at}: {last and last.evidence}"
        )

    def assert_trace(self, cid: str, stopped_at: str | None, cause: str) -> dict:
        doc = self.trace(cid)
        assert (doc["stopped_at"], doc["cause"]) == (stopped_at, cause), doc["evidence"]
        return doc


async def wait_alert(db_url: str, cid: str, timeout: float = 30.0) -> asyncpg.Record:
    """The collector's alert for ``cid`` once its cause is filled in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = await asyncpg.connect(db_url)
        try:
            row = await conn.fetchrow(
                "SELECT cause, evidence FROM alerts WHERE correlation_id = $1 AND cause IS NOT NULL",
                cid,
            )
        finally:
            await conn.close()
        if row is not None:
            return row
        await asyncio.sleep(0.3)
    raise AssertionError(f"no alert with a cause for {cid} in {timeout}s")


def short_deadlines(path: Path) -> None:
    text = path.read_text()
    text = re.sub(r'^deadline\s*=\s*"[^"]+"', f'deadline = "{DEADLINE_S}s"', text, flags=re.M)
    path.write_text(text)


def start_collector(env: dict[str, str], workdir: Path) -> subprocess.Popen:
    ready = workdir / "collector.ready"
    log = open(workdir / "collector.log", "ab")  # noqa: SIM115 - kept open for the process
    proc = subprocess.Popen(
        [HOPTRACE, "collector"],
        env={**env, "HOPTRACE_READY_FILE": str(ready)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 45
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((workdir / "collector.log").read_text()[-2000:])
        time.sleep(0.05)
    return proc


def make_stack(admin_db_url: str, bootstrap: str, tmp: Path, ensure_topics: bool = True):
    name = unique("hoptrace_d_")
    db_url = asyncio.run(create_database(admin_db_url, name))
    spec_path = isolated_spec(tmp, unique(""))
    short_deadlines(spec_path)
    spec = load_spec(spec_path)
    grpc, http = free_port(), free_port()
    env = service_env(db_url, bootstrap, spec_path, None)
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.update(
        {
            "HOPTRACE_OTLP_GRPC_PORT": str(grpc),
            "HOPTRACE_OTLP_HTTP_PORT": str(http),
            "HOPTRACE_STALL_SCAN_INTERVAL": "0.5",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{http}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "HOPTRACE_JAEGER_URL": "http://jaeger.test:16686",
        }
    )
    if ensure_topics:
        res = subprocess.run(
            [HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
    collector = start_collector(env, tmp)
    services = Services(env, tmp)
    return Stack(db_url, bootstrap, spec_path, spec, services, collector), name


def teardown(stack: Stack, admin_db_url: str, name: str) -> None:
    stack.services.stop_all()
    stack.collector.terminate()
    try:
        stack.collector.wait(20)
    except subprocess.TimeoutExpired:
        stack.collector.kill()
    asyncio.run(delete_topics(stack.bootstrap, stack.spec.topics))
    asyncio.run(drop_database(admin_db_url, name))
    # stopped, it closed the Kafka clients its diagnoses (the alerts' causes) opened
    log = (stack.services.workdir / "collector.log").read_text(errors="replace")
    assert "Unclosed AIOKafkaConsumer" not in log, log[-2000:]


@pytest.fixture(scope="module")
def pipe(
    admin_db_url: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s, name = make_stack(admin_db_url, kafka_bootstrap, tmp_path_factory.mktemp("diag"))
    try:
        s.services.start_all()
        yield s
    finally:
        teardown(s, admin_db_url, name)


@pytest.fixture(autouse=True)
async def _close_api() -> None:
    yield
    await api.close()


def ensure_running(stack: Stack, name: str, fault: str | None = None) -> None:
    """``name`` running with exactly ``fault`` (restarted when it differs)."""
    proc = stack.services.procs.get(name)
    if proc is not None and proc.poll() is None and stack.services.faults.get(name) == fault:
        return
    if proc is not None:
        stack.services.stop(name)
    stack.services.start(name, fault)


def healthy(stack: Stack) -> None:
    for name in (
        "admin-service",
        "payment-service",
        "purchase-worker",
        "allocation-worker",
        "session-worker",
    ):
        ensure_running(stack, name)


# ------------------------------------------------------------------------------------ causes


async def test_completed(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    cid = stack.pay()
    await stack.wait_cause(cid, "completed")
    doc = stack.assert_trace(cid, None, "completed")
    assert doc["state"] == "completed"
    assert [s["status"] for s in doc["steps"]] == ["done"] * 4
    assert doc["jaeger_urls"][0].startswith("http://jaeger.test:16686/trace/")


async def test_worker_stopped_is_no_consumer(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    stack.services.stop("session-worker")
    cid = stack.pay()
    await stack.wait_cause(cid, "no_consumer")
    doc = stack.assert_trace(cid, "session.created", "no_consumer")
    assert doc["next_action"] == "start session-worker"
    # past the deadline the collector's stall alert carries the cause and its evidence
    alert = await wait_alert(stack.db_url, cid)
    assert alert["cause"] == "no_consumer", dict(alert)
    assert "has no members" in alert["evidence"] and "start session-worker" in alert["evidence"]
    # started again, it picks the record up and the payment completes
    stack.services.start("session-worker")
    await stack.wait_cause(cid, "completed")


async def test_slow_worker_is_in_progress_then_consumer_lag(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    stack.services.env["HOPTRACE_SLOW_DELAY_S"] = str(DEADLINE_S * 3)
    try:
        ensure_running(stack, "allocation-worker", "slow")
    finally:
        stack.services.env.pop("HOPTRACE_SLOW_DELAY_S")
    cid = stack.pay()
    early = await stack.wait_cause(
        cid, "in_progress", timeout=DEADLINE_S * 2, at="trainer.allocated"
    )
    assert early.step("trainer.allocated").status == "pending"
    await stack.wait_cause(cid, "consumer_lag", timeout=DEADLINE_S * 3)
    doc = stack.assert_trace(cid, "trainer.allocated", "consumer_lag")
    step = next(s for s in doc["steps"] if s["id"] == "trainer.allocated")
    assert step["status"] == "stalled"
    assert step["kafka"]["group_members"] >= 1
    ensure_running(stack, "allocation-worker")


async def test_admin_500_is_downstream_error(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    ensure_running(stack, "admin-service", "http-500")
    cid = stack.pay()
    await stack.wait_cause(cid, "downstream_error", timeout=60)
    doc = stack.assert_trace(cid, "trainer.allocated", "downstream_error")
    assert doc["state"] == "failed"
    step = next(s for s in doc["steps"] if s["id"] == "trainer.allocated")
    assert step["kafka"]["dlq"] is not None, "the dead-lettered record is found"
    ensure_running(stack, "admin-service")


async def test_admin_silent_failure_with_verification_is_processing_error(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    ensure_running(stack, "admin-service", "silent-no-write")
    cid = stack.pay()
    await stack.wait_cause(cid, "processing_error", timeout=60)
    doc = stack.assert_trace(cid, "trainer.allocated", "processing_error")
    assert any("effect missing" in line.lower() for line in doc["evidence"]), doc["evidence"]
    ensure_running(stack, "admin-service")


async def test_admin_silent_failure_in_legacy_mode_is_marked_without_effect(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    ensure_running(stack, "admin-service", "silent-no-write")
    ensure_running(stack, "allocation-worker", "no-verify")
    cid = stack.pay()
    await stack.wait_cause(cid, "marked_without_effect")
    doc = stack.assert_trace(cid, "trainer.allocated", "marked_without_effect")
    assert any("processed_events" in line for line in doc["evidence"])
    ensure_running(stack, "admin-service")
    ensure_running(stack, "allocation-worker")


async def test_wrong_group_goes_through_with_a_warning(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    ensure_running(stack, "allocation-worker", "wrong-group")
    cid = stack.pay()
    await stack.wait_cause(cid, "completed")
    doc = stack.assert_trace(cid, None, "completed")
    group = stack.spec.step("trainer.allocated").group
    assert any(f"{group}-v2" in w for w in doc["warnings"]), doc["warnings"]
    # the wrong-group worker stops: the spec's group has no member, and the evidence names
    # the group that consumed the topic instead
    stack.services.stop("allocation-worker")
    cid2 = stack.pay()
    d = await stack.wait_cause(cid2, "no_consumer")
    kf = d.facts.kafka["trainer.allocated"]
    assert f"{group}-v2" in (kf.other_groups or ()), kf
    assert f"{group}-v2" in d.next_action
    ensure_running(stack, "allocation-worker")


def test_wrong_group_deployed_late_leaves_earlier_payments_stalled(
    admin_db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The misconfigured deployment: allocation-worker comes up under the wrong group after a
    payment's record was produced; a new group starts at the end of the log, so that payment is
    never handled, and the diagnosis names the group that is consuming instead. (Its own stack:
    the wrong group must be brand new, as in the incident, not one left by another test.)"""
    stack, name = make_stack(admin_db_url, kafka_bootstrap, tmp_path)
    group = stack.spec.step("trainer.allocated").group

    async def scenario() -> None:
        try:
            early = stack.pay()
            await stack.wait_cause(early, "no_consumer", at="trainer.allocated")
            ensure_running(stack, "allocation-worker", "wrong-group")
            later = stack.pay()  # produced after the wrong group joined: handled by it
            await stack.wait_cause(later, "completed", timeout=60)
            d = await stack.wait_cause(early, "no_consumer", at="trainer.allocated")
            kf = d.facts.kafka["trainer.allocated"]
            assert f"{group}-v2" in (kf.other_groups or ()), kf
            doc = stack.assert_trace(early, "trainer.allocated", "no_consumer")
            assert f"{group}-v2" in doc["next_action"]
            ensure_running(stack, "allocation-worker")
            await stack.wait_cause(early, "completed", timeout=60)
        finally:
            await api.close()

    try:
        for svc in ("admin-service", "payment-service", "purchase-worker", "session-worker"):
            stack.services.start(svc)
        asyncio.run(scenario())
    finally:
        teardown(stack, admin_db_url, name)


async def test_event_not_emitted(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    ensure_running(stack, "payment-service", "skip-emit")
    cid = stack.pay()
    await stack.wait_cause(cid, "not_emitted")
    stack.assert_trace(cid, "purchase.created", "not_emitted")
    ensure_running(stack, "payment-service")


async def test_uninstrumented_consumer_is_consumed_without_trace(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    stack.services.stop("purchase-worker")
    stack.services.env["OTEL_SDK_DISABLED"] = "true"
    try:
        stack.services.start("purchase-worker")
    finally:
        stack.services.env.pop("OTEL_SDK_DISABLED")
    stack.services.faults["purchase-worker"] = "uninstrumented"  # restart it afterwards
    cid = stack.pay()
    await stack.wait_cause(cid, "consumed_without_trace", timeout=DEADLINE_S * 6)
    doc = stack.assert_trace(cid, "purchase.created", "consumed_without_trace")
    assert any("row present" in line for line in doc["evidence"]), doc["evidence"]
    ensure_running(stack, "purchase-worker")


async def test_crash_after_write_is_redelivered_and_completes(pipe: Stack) -> None:
    """Edge case on the real stack: the worker dies after its DB commit; the restarted worker
    gets the record again (duplicate: no second row, the stored event is re-emitted)."""
    stack = pipe
    healthy(stack)
    stack.services.stop("purchase-worker")
    stack.services.start("purchase-worker", "crash-after-write")
    cid = stack.pay()
    proc = stack.services.procs["purchase-worker"]
    proc.wait(30)
    stack.services.procs.pop("purchase-worker")
    stack.services.start("purchase-worker")
    d = await stack.wait_cause(cid, "completed")
    assert "duplicate" in d.step("purchase.created").outcomes


def test_topic_missing(admin_db_url: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    """Topics never created: payment-service cannot emit purchase-confirmed."""
    s, name = make_stack(admin_db_url, kafka_bootstrap, tmp_path, ensure_topics=False)
    try:
        s.services.start("payment-service")
        cid = s.pay()

        async def check() -> object:
            try:
                return await s.wait_cause(cid, "topic_missing")
            finally:
                await api.close()

        asyncio.run(check())
        doc = s.assert_trace(cid, "payment.confirmed", "topic_missing")
        assert doc["next_action"].startswith(f"create topic {s.spec.steps[0].emits}")
    finally:
        teardown(s, admin_db_url, name)
