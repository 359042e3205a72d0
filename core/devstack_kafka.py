"""The local stack's Apache Kafka: one KRaft broker (broker and controller in one JVM) on
127.0.0.1, its jars resolved by Maven from Maven Central into the shared jar cache, its storage
formatted once, topic auto-creation off (topics appear only through `hoptrace topics ensure`).

With ``HOPTRACE_DEV_KAFKA_SASL_PORT`` the broker also listens with SASL_PLAINTEXT on that port
(SCRAM-SHA-256 and SCRAM-SHA-512): its SCRAM user (``hoptrace``, password drawn then and kept in
``<home>/kafka-sasl.password``) is created by Kafka's own storage tool when the folder is
formatted (``--add-scram``), the way a managed Kafka's credentials exist before any client."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import subprocess
import uuid
from pathlib import Path

from .devstack_config import (
    KAFKA_SASL_USER,
    STACK_FILES,
    StackConfig,
    StackError,
    initialising_marker,
)
from .devstack_process import Part, port_open, tail

KAFKA_VERSION = "4.1.1"
#: The SASL mechanisms of the optional SASL_PLAINTEXT listener (its user has both).
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


def java() -> str:
    found = shutil.which("java")
    if not found:
        raise StackError(
            "`java` not found: install a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"
        )
    return found


def libs(cfg: StackConfig) -> Path:
    """The broker's jars (in the jar cache, shared by every stack that names the same cache)."""
    return cfg.cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"


def fetch_jars(cfg: StackConfig) -> None:
    """Resolve the broker's jars with Maven once (a ``.complete`` file marks a finished cache)."""
    folder = libs(cfg)
    done = folder.parent / ".complete"
    if done.exists():
        return
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError(
            "`mvn` not found: install Maven (apt-get install maven) so the Kafka jars can be resolved"
        )
    cfg.logs.mkdir(parents=True, exist_ok=True)
    log = cfg.logs / "kafka-mvn.log"
    tmp = folder.parent / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(log, "wb") as out:
        res = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(STACK_FILES / "kafka-pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp}",
                "-DincludeScope=runtime",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if res.returncode != 0:
        raise StackError(f"resolving the Kafka {KAFKA_VERSION} jars with Maven failed; see {log}")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    done.write_text(KAFKA_VERSION + "\n")


def server_properties(cfg: StackConfig, data: Path) -> str:
    """The broker's configuration: single node, loopback only, no topic auto-creation; with a
    SASL port, a SASL_PLAINTEXT listener that accepts SCRAM-SHA-256/512 logins."""
    listeners = (
        f"PLAINTEXT://127.0.0.1:{cfg.kafka_port},CONTROLLER://127.0.0.1:{cfg.controller_port}"
    )
    protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    sasl = ""
    if cfg.kafka_sasl_port:
        listeners += f",SASL_PLAINTEXT://127.0.0.1:{cfg.kafka_sasl_port}"
        protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
        sasl = f"sasl.enabled.mechanisms={','.join(SCRAM_MECHANISMS)}\n" + "".join(
            f"listener.name.sasl_plaintext.{m.lower()}.sasl.jaas.config={_SCRAM_LOGIN}\n"
            for m in SCRAM_MECHANISMS
        )
    return (
        "process.roles=broker,controller\n"
        "node.id=1\n"
        f"controller.quorum.bootstrap.servers=127.0.0.1:{cfg.controller_port}\n"
        f"listeners={listeners}\n"
        f"advertised.listeners={listeners}\n"
        "controller.listener.names=CONTROLLER\n"
        "inter.broker.listener.name=PLAINTEXT\n"
        f"listener.security.protocol.map={protocols}\n"
        f"{sasl}"
        f"log.dirs={data}\n"
        "num.partitions=3\n"
        "auto.create.topics.enable=false\n"
        "offsets.topic.replication.factor=1\n"
        "offsets.topic.num.partitions=10\n"
        "transaction.state.log.replication.factor=1\n"
        "transaction.state.log.min.isr=1\n"
        "share.coordinator.state.topic.replication.factor=1\n"
        "share.coordinator.state.topic.min.isr=1\n"
        "group.initial.rebalance.delay.ms=0\n"
        "log.retention.hours=24\n"
        "message.max.bytes=10485760\n"
    )


def cluster_id() -> str:
    """A random cluster id as Kafka writes them (URL-safe base64 of 16 bytes), never starting
    with "-" (Kafka's Uuid.randomUuid rules those out too: a command line reads them as options)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class KafkaBroker(Part):
    """The broker; its data folder is ``<home>/<name>``."""

    def __init__(self, name: str, cfg: StackConfig) -> None:
        super().__init__(name, cfg, port=cfg.kafka_port, marker="kafka.Kafka")

    @property
    def libs(self) -> Path:
        return libs(self.cfg)

    @property
    def data(self) -> Path:
        return self.cfg.home / self.name

    @property
    def properties(self) -> Path:
        return self.cfg.home / "kafka-server.properties"

    def _jvm(self, log: Path) -> list[str]:
        return [
            java(),
            f"-Dhoptrace.kafka.log={log}",
            f"-Dlog4j2.configurationFile={STACK_FILES / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
        ]

    def prepare(self) -> None:
        java()
        fetch_jars(self.cfg)
        self.cfg.home.mkdir(parents=True, exist_ok=True)
        self.properties.write_text(server_properties(self.cfg, self.data))
        marker = initialising_marker(self.data)
        if (self.data / "meta.properties").exists() and not marker.exists():
            if self.cfg.kafka_sasl_port and self.cfg.kafka_sasl_password() is None:
                raise StackError(
                    f"{self.data} was formatted without a SASL user, so a SASL listener would "
                    "accept no login; use another HOPTRACE_HOME for a stack with "
                    "HOPTRACE_DEV_KAFKA_SASL_PORT (the SCRAM user is created at format)"
                )
            return
        if self.data.exists() and any(self.data.iterdir()) and not marker.exists():
            raise StackError(
                f"{self.data} exists but is not a Kafka log folder hoptrace formatted; "
                f"move it away yourself (hoptrace will not delete it), then run `hoptrace dev up`"
            )
        marker.write_text("format in progress\n")
        if self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True)
        self._format()
        marker.unlink()

    def _scram_users(self) -> list[str]:
        """``--add-scram`` arguments creating the SASL listener's user (none without one)."""
        if not self.cfg.kafka_sasl_port:
            return []
        password = self.cfg.kafka_sasl_password()
        if password is None:
            password = secrets.token_urlsafe(18)
            path = self.cfg.kafka_sasl_password_file
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        args = []
        for mechanism in SCRAM_MECHANISMS:
            args += ["--add-scram", f"{mechanism}=[name={KAFKA_SASL_USER},password={password}]"]
        return args

    def _format(self) -> None:
        log = self.cfg.logs / "kafka-format.log"
        with open(log, "wb") as out:
            res = subprocess.run(
                [
                    *self._jvm(log),
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    f"--cluster-id={cluster_id()}",
                    "-c",
                    str(self.properties),
                    "--ignore-formatted",
                    *self._scram_users(),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if res.returncode != 0:
            raise StackError(f"formatting Kafka storage failed; see {log} ({tail(log, 2)})")

    def command(self) -> list[str]:
        jvm = self._jvm(self.log_file)
        memory = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true"]
        return [jvm[0], *memory, *jvm[1:], "kafka.Kafka", str(self.properties)]

    def ready(self) -> bool:
        if not port_open(self.cfg.kafka_port):
            return False
        try:
            return asyncio.run(_metadata(self.cfg.kafka_bootstrap))
        except Exception:
            return False


async def _metadata(bootstrap: str) -> bool:
    """A real metadata request: the broker answers with itself as a live broker."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(admin.start(), 5)
        await asyncio.wait_for(admin.list_topics(), 5)
        return True
    finally:
        await admin.close()
