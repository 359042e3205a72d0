"""The compose file's Kafka settings, run on a real Kafka 4.1.1 broker (the local stack's jars,
same release as the apache/kafka:4.1.1 image): its KAFKA_* variables turned into
server.properties the way the image does, storage formatted with its CLUSTER_ID, only the
listener addresses moved to free loopback ports. The broker starts, `hoptrace topics ensure`
creates the pipeline's topics on it, and a topic nobody created is not auto-created."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from hoptrace import devstack, devstack_kafka
from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT

from ..support import free_port

pytestmark = pytest.mark.timeout(180)

HOPTRACE = str(Path(sys.executable).parent / "hoptrace")
#: Variables the image's launcher reads itself instead of turning into properties.
NOT_PROPERTIES = {
    "KAFKA_VERSION",
    "KAFKA_HEAP_OPTS",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_GC_LOG_OPTS",
    "KAFKA_LOG4J_ROOT_LOGLEVEL",
    "KAFKA_LOG4J_LOGGERS",
    "KAFKA_TOOLS_LOG4J_LOGLEVEL",
    "KAFKA_JMX_HOSTNAME",
    "KAFKA_JMX_PORT",
}


def image_properties(env: dict[str, Any]) -> dict[str, str]:
    """apache/kafka's rule: KAFKA_FOO_BAR -> foo.bar (``__`` -> ``_``, ``___`` -> ``-``)."""
    props = {}
    for key, value in env.items():
        if not key.startswith("KAFKA_") or key in NOT_PROPERTIES:
            continue
        name = key[len("KAFKA_") :].replace("___", "-").replace("__", "\0")
        props[name.replace("_", ".").replace("\0", "_").lower()] = str(value)
    return props


async def _admin_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await asyncio.wait_for(admin.start(), 5)
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def broker_up(bootstrap: str) -> bool:
    try:
        asyncio.run(_admin_topics(bootstrap))
        return True
    except (KafkaError, OSError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def broker(
    stack: devstack.StackConfig, services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = services["kafka"]["environment"]
    props = image_properties(env)
    # What the compose file says about the network (checked here), then moved to loopback.
    assert props["listeners"] == "PLAINTEXT://:9092,CONTROLLER://:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://kafka:9092"
    assert props["controller.quorum.voters"] == "1@kafka:9093"
    tmp = tmp_path_factory.mktemp("kafka")
    port, controller = free_port(), free_port()
    props.update(
        {
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            "log.dirs": str(tmp / "data"),
        }
    )
    config = tmp / "server.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in sorted(props.items())))
    kafka = devstack.KafkaPart(stack)
    java = [
        devstack_kafka.java(),
        "-Xms128m",
        "-Xmx512m",
        f"-Dhoptrace.kafka.log={tmp / 'kafka.log'}",
        f"-Dlog4j2.configurationFile={devstack.STACK_FILES / 'log4j2.properties'}",
        "-cp",
        f"{kafka.libs}/*",
    ]
    fmt = subprocess.run(
        [*java, "kafka.tools.StorageTool", "format", "-t", env["CLUSTER_ID"], "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert fmt.returncode == 0, (
        f"format with the compose CLUSTER_ID failed: {fmt.stdout}{fmt.stderr}"
    )
    with open(tmp / "stdout.log", "wb") as out:
        proc = subprocess.Popen(
            [*java, "kafka.Kafka", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    bootstrap = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not broker_up(bootstrap):
            assert proc.poll() is None, (tmp / "stdout.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "broker with the compose settings did not start"
            time.sleep(0.5)
        yield bootstrap
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp / "data", ignore_errors=True)


def test_compose_settings_match_the_pipeline_spec(services: dict[str, Any]) -> None:
    props = image_properties(services["kafka"]["environment"])
    spec = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
    assert props["process.roles"] == "broker,controller"
    assert props["auto.create.topics.enable"] == "false"
    assert int(props["offsets.topic.replication.factor"]) >= spec.replication_factor
    assert props["inter.broker.listener.name"] == "PLAINTEXT"


def test_topics_ensure_creates_the_pipeline_topics_on_it(broker: str) -> None:
    spec = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
    res = subprocess.run(
        [HOPTRACE, "topics", "ensure"],
        env={"PATH": "/usr/bin:/bin", "HOPTRACE_KAFKA_BOOTSTRAP": broker},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert set(spec.topics) <= asyncio.run(_admin_topics(broker))


def test_a_topic_nobody_created_is_not_auto_created(broker: str) -> None:
    topic = f"never-created-{uuid.uuid4().hex[:8]}"

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker, request_timeout_ms=2000)
        await producer.start()
        try:
            with pytest.raises(KafkaError):
                await producer.send_and_wait(topic, b"x")
        finally:
            await producer.stop()

    asyncio.run(produce())
    assert topic not in asyncio.run(_admin_topics(broker))
