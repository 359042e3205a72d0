"""Module-scoped pipeline fixtures: one database, one isolated spec (own topics and groups), the
topics created by `hoptrace topics ensure`, an OTLP receiver, and the five services started as
users start them. Tests in a module share them and use their own payments."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hoptrace.contract import PipelineSpec, load_spec
from tests.support import create_database, delete_topics, drop_database, isolated_spec, unique

from .harness import HOPTRACE, ORDER, OtlpReceiver, Services, service_env


@dataclass
class Pipeline:
    db_url: str
    bootstrap: str
    spec_path: Path
    spec: PipelineSpec
    otlp: OtlpReceiver
    services: Services

    @property
    def env(self) -> dict[str, str]:
        return self.services.env

    def topic(self, step_id: str) -> str:
        topic = self.spec.step(step_id).consumes
        assert topic
        return topic

    def group(self, step_id: str) -> str:
        group = self.spec.step(step_id).group
        assert group
        return group

    def pay(
        self, student: str = "student-1", course: str = "course-1", amount: str = "49.00"
    ) -> str:
        res = subprocess.run(
            [HOPTRACE, "pay", "--student", student, "--course", course, "--amount", amount],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def pipeline_env(
    admin_db_url: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """Database, spec, topics and OTLP receiver (services not started)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    name = unique("hoptrace_w_")
    db_url = asyncio.run(create_database(admin_db_url, name))
    spec_path = isolated_spec(tmp, unique(""))
    spec = load_spec(spec_path)
    otlp = OtlpReceiver()
    env = service_env(db_url, kafka_bootstrap, spec_path, otlp)
    res = subprocess.run([HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    services = Services(env, tmp)
    pipe = Pipeline(db_url, kafka_bootstrap, spec_path, spec, otlp, services)
    try:
        yield pipe
    finally:
        services.stop_all()
        otlp.close()
        asyncio.run(delete_topics(kafka_bootstrap, spec.topics))
        asyncio.run(drop_database(admin_db_url, name))


@pytest.fixture(scope="module")
def pipeline(pipeline_env: Pipeline) -> Pipeline:
    """The five services running (started once per module)."""
    pipeline_env.services.start_all()
    return pipeline_env


@pytest.fixture
def running(pipeline: Pipeline) -> Iterator[Pipeline]:
    """The shared pipeline; after the test every service runs again, without faults."""
    yield pipeline
    svc = pipeline.services
    for name in ORDER:
        proc = svc.procs.get(name)
        if proc is not None and proc.poll() is None and svc.faults.get(name):
            svc.stop(name)
            proc = None
        if proc is None or proc.poll() is not None:
            svc.procs.pop(name, None)
            svc.start(name)
