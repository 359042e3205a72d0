"""The local stack operated for real, on a private stack: `hoptrace dev up` with a Kafka that
also listens with SASL_PLAINTEXT (SCRAM-SHA-512; the user made by Kafka's storage tool at format)
and with Jaeger (all-in-one, in-memory), every hoptrace process pointed at the SASL listener.

* a payment travels every hop through SASL (each worker's connections go to the SASL port only),
  the collector's evidence lookup reads Kafka through it, the Kafka span source consumes through
  it;
* the services export to Jaeger as well as to the collector, and `hoptrace trace` prints Jaeger
  links only when a Jaeger is configured (``HOPTRACE_JAEGER_URL``), links that open the trace;
* a wrong password (or no SASL at all) fails with one clear line naming the cause, never the
  password.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from hoptrace import devstack
from hoptrace.contract import load_spec
from hoptrace.kafka import client_options, connection_problem
from hoptrace.repair.sources import Sources
from tests.support import REFERENCE_SPEC

from ..collector.helpers import request, step_span
from ..deploy.gotools import go_tool, timeout_for
from .devstack_sasl import SaslStack, sasl_stack, socket_ports

# the first test also brings the stack up (and builds Jaeger if scripts/go-tools.sh has not)
pytestmark = [pytest.mark.stack, pytest.mark.slow, timeout_for("jaeger", 900)]

HOPS = ("purchase-worker", "allocation-worker", "session-worker")
WRONG = "not-the-password-4711"


@pytest.fixture(scope="module")
def up(stack: devstack.StackConfig) -> Iterator[SaslStack]:
    go_tool("jaeger")  # built once by scripts/go-tools.sh (a no-op when current)
    with sasl_stack(stack.cache_dir) as s:
        infra = s.hoptrace("dev", "up", "--infra-only", timeout=300)
        assert infra.returncode == 0, infra.stderr

        async def span_topic() -> None:
            admin = AIOKafkaAdminClient(
                bootstrap_servers=s.cfg.kafka_sasl_bootstrap, **client_options(s.kafka())
            )
            await admin.start()
            try:
                await admin.create_topics([NewTopic(s.span_topic, 1, 1)])
            finally:
                await admin.close()

        asyncio.run(span_topic())
        full = s.hoptrace("dev", "up", timeout=600)
        assert full.returncode == 0, f"{full.stdout}\n{full.stderr}\n{s.log('collector')}"
        assert "jaeger             started" in full.stdout, full.stdout
        assert f"export HOPTRACE_JAEGER_URL={s.cfg.jaeger_url}" in full.stdout
        yield s


def _pid(s: SaslStack, part: str) -> int:
    return int((s.cfg.run / f"{part}.pid").read_text())


def _trace(s: SaslStack, cid: str, **extra: str) -> tuple[int, dict[str, Any] | str]:
    res = s.hoptrace("trace", cid, "--format", "json", env=s.client_env(**extra), timeout=90)
    if res.returncode == 0:
        return 0, json.loads(res.stdout)
    return res.returncode, res.stderr


@pytest.fixture(scope="module")
def payment(up: SaslStack) -> tuple[str, dict[str, Any]]:
    """One payment paid through payment-service, traced until it completed."""
    paid = up.hoptrace("pay", env=up.client_env(), timeout=60)
    assert paid.returncode == 0, paid.stderr
    cid = paid.stdout.strip().splitlines()[-1]
    jaeger = {"HOPTRACE_JAEGER_URL": up.cfg.jaeger_url}
    deadline = time.monotonic() + 120
    while True:
        code, doc = _trace(up, cid, **jaeger)
        if code == 0 and isinstance(doc, dict) and doc["state"] == "completed":
            return cid, doc
        assert time.monotonic() < deadline, f"payment {cid} not completed: {doc}\n" + "\n".join(
            f"--- {p}\n{up.log(p, 15)}" for p in ("collector", *HOPS)
        )
        time.sleep(1.0)


def test_every_hop_runs_through_the_sasl_listener(
    up: SaslStack, payment: tuple[str, dict[str, Any]]
) -> None:
    _cid, doc = payment
    assert [s["status"] for s in doc["steps"]] == ["done"] * len(doc["steps"])
    sasl, plain = up.cfg.kafka_sasl_port, up.cfg.kafka_port
    for part in ("payment-service", *HOPS):
        pid = _pid(up, part)
        environ = dict(
            item.split("=", 1)
            for item in open(f"/proc/{pid}/environ").read().split("\0")
            if "=" in item
        )
        assert environ["HOPTRACE_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", part
        ports = socket_ports(pid)
        assert sasl in ports and plain not in ports, (part, ports)


def test_evidence_is_read_through_sasl(payment: tuple[str, dict[str, Any]]) -> None:
    _cid, doc = payment
    assert doc["cause"] == "completed" and doc["missing_evidence"] == {}
    consumers = [s for s in doc["steps"] if s["kafka"] is not None]
    assert consumers and all(s["kafka"]["topic_exists"] for s in consumers)
    assert all((s["kafka"]["group_members"] or 0) >= 1 for s in consumers), consumers


def test_redrive_reads_kafka_through_sasl(up: SaslStack) -> None:
    """Redrive's own reads (the topics, a stuck record at its offset) use the SASL settings too."""

    async def topics() -> set[str]:
        pool = await asyncpg.create_pool(up.cfg.database_url, min_size=1, max_size=1)
        try:
            async with Sources(load_spec(REFERENCE_SPEC), pool, up.kafka()) as sources:
                return await asyncio.wait_for(sources.topics(), 30)
        finally:
            await pool.close()

    assert up.span_topic in asyncio.run(topics())


def test_a_producer_only_step_emitted_and_consumed_nothing(
    payment: tuple[str, dict[str, Any]],
) -> None:
    _cid, doc = payment
    first = doc["steps"][0]
    assert first["consumed"] is None and first["emitted"] is not None
    assert not [e for e in first["evidence"] if "consumed" in e], first["evidence"]


def test_the_span_source_consumes_through_sasl(up: SaslStack) -> None:
    cid = f"sasl-span-{os.urandom(4).hex()}"

    async def produce_and_find() -> int:
        producer = AIOKafkaProducer(
            bootstrap_servers=up.cfg.kafka_sasl_bootstrap, **client_options(up.kafka())
        )
        await producer.start()
        try:
            body = request([step_span(cid, 0)]).SerializeToString()
            await producer.send_and_wait(up.span_topic, body)
        finally:
            await producer.stop()
        conn = await asyncpg.connect(up.cfg.database_url)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                n = await conn.fetchval("SELECT count(*) FROM spans WHERE correlation_id = $1", cid)
                if n:
                    return int(n)
                await asyncio.sleep(0.25)
            return 0
        finally:
            await conn.close()

    assert asyncio.run(produce_and_find()) == 1, up.log("collector")


def test_services_export_to_jaeger_too_and_links_open_the_trace(
    up: SaslStack, payment: tuple[str, dict[str, Any]]
) -> None:
    cid, doc = payment
    status = up.hoptrace("dev", "status")
    jaeger_line = next(ln for ln in status.stdout.splitlines() if ln.startswith("jaeger"))
    assert jaeger_line.split()[1] == "up", status.stdout
    links = doc["jaeger_urls"]
    assert links and all(u.startswith(f"{up.cfg.jaeger_url}/trace/") for u in links)
    api = f"{up.cfg.jaeger_url}/api/traces/"
    deadline = time.monotonic() + 60
    services: set[str] = set()
    while time.monotonic() < deadline:
        services = set()
        for link in links:
            resp = httpx.get(api + link.rsplit("/", 1)[1], timeout=5, trust_env=False)
            if resp.status_code == 200:
                for trace in resp.json()["data"]:
                    services |= {p["serviceName"] for p in trace["processes"].values()}
        if {"payment-service", *HOPS} <= services:
            break
        time.sleep(0.5)
    assert {"payment-service", *HOPS} <= services, services
    assert all(httpx.get(u, timeout=5, trust_env=False).status_code == 200 for u in links)

    text = up.hoptrace("trace", cid, env=up.client_env()).stdout  # no HOPTRACE_JAEGER_URL
    traces = [ln for ln in text.splitlines() if ln.startswith("trace: ")]
    assert traces and not [ln for ln in traces if "http" in ln], traces
    linked = up.hoptrace(
        "trace", cid, env=up.client_env(HOPTRACE_JAEGER_URL=up.cfg.jaeger_url)
    ).stdout
    assert f"trace: {links[0]}" in linked


def test_a_wrong_password_is_one_clear_line(
    up: SaslStack, payment: tuple[str, dict[str, Any]]
) -> None:
    cid, _doc = payment
    bad = up.client_env(password=WRONG)
    ensure = up.hoptrace("topics", "ensure", env=bad)
    assert ensure.returncode == 2
    lines = [ln for ln in ensure.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, ensure.stderr
    assert "refused the SASL login of user 'hoptrace' (SCRAM-SHA-512)" in lines[0]
    assert WRONG not in ensure.stderr + ensure.stdout

    worker = up.hoptrace("worker", "purchase-worker", env={**bad, "OTEL_SDK_DISABLED": "true"})
    assert worker.returncode == 1
    assert "purchase-worker could not start: Kafka at" in worker.stderr, worker.stderr[-2000:]
    assert "refused the SASL login" in worker.stderr and "Traceback" not in worker.stderr
    assert WRONG not in worker.stderr

    code, doc = _trace(up, cid, HOPTRACE_KAFKA_SASL_PASSWORD=WRONG)
    assert code == 0 and isinstance(doc, dict)
    assert "refused the SASL login" in doc["missing_evidence"].get("kafka", ""), doc[
        "missing_evidence"
    ]


def test_a_client_without_sasl_is_told_what_the_listener_expects(up: SaslStack) -> None:
    plain = up.kafka(kafka_security_protocol="PLAINTEXT")
    problem = asyncio.run(connection_problem(plain))
    assert problem is not None and "HOPTRACE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in problem
    other = up.kafka(kafka_sasl_mechanism="PLAIN")
    problem = asyncio.run(connection_problem(other))
    assert problem is not None and "does not enable SASL mechanism PLAIN" in problem
    assert asyncio.run(connection_problem(up.kafka())) is None
