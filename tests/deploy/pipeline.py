"""The reference pipeline for the deploy tests: own database, own topics and groups (created by
`hoptrace topics ensure`), the five services started as users start them (`hoptrace worker`),
exporting OTLP/gRPC to a given endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hoptrace.contract import PipelineSpec, load_spec
from tests.support import create_database, delete_topics, drop_database, isolated_spec, unique
from tests.workers.harness import HOPTRACE, Services, service_env


@dataclass
class Pipeline:
    db_url: str
    spec_path: Path
    spec: PipelineSpec
    env: dict[str, str]
    services: Services

    def pay(self) -> str:
        """One payment through payment-service; its id (the correlation id)."""
        res = subprocess.run(
            [HOPTRACE, "pay", "--student", "student-1", "--course", "course-1"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.services.tail(n)}" for n in self.services.procs)


@contextlib.contextmanager
def running_pipeline(
    admin_db_url: str,
    bootstrap: str,
    workdir: Path,
    otlp_grpc_endpoint: str,
    start: bool = True,
    otlp_token: str | None = None,
) -> Iterator[Pipeline]:
    """Database, spec and topics; the services too unless ``start`` is false (then the caller
    runs ``pipeline.services.start_all()``). ``otlp_token``: the services send it as compose
    has them send it (``OTEL_EXPORTER_OTLP_HEADERS``). Everything is removed on exit."""
    name = unique("hoptrace_d_")
    db_url = asyncio.run(create_database(admin_db_url, name))
    spec_path = isolated_spec(workdir, unique(""))
    spec = load_spec(spec_path)
    env = service_env(db_url, bootstrap, spec_path, None)
    for key in ("OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED"):
        env.pop(key, None)
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_grpc_endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    if otlp_token is not None:
        env["OTEL_EXPORTER_OTLP_HEADERS"] = f"authorization=Bearer%20{otlp_token}"
    services = Services(env, workdir)
    try:
        res = subprocess.run(
            [HOPTRACE, "topics", "ensure"], env=env, capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr
        if start:
            services.start_all()
        yield Pipeline(db_url, spec_path, spec, env, services)
    finally:
        services.stop_all()
        asyncio.run(delete_topics(bootstrap, spec.topics))
        asyncio.run(drop_database(admin_db_url, name))
