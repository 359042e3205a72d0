"""`hoptrace check deploy`: small compose files written to tmp, checked against the reference spec."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hoptrace.collector.deploy_check import ComposeError, check_deploy
from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT
from hoptrace.workers import faults

SPEC = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
#: The reference workers' fault switch that changes a worker's consumer group, as the command
#: line wires it into the check.
GROUP_FAULTS = faults.GROUP_FAULTS

FULL = """
x-env: &env
  HOPTRACE_PIPELINE: /app/pipelines/payments.toml
services:
  init:
    image: hoptrace
    entrypoint: ["/bin/sh", "-c"]
    command: ["hoptrace migrate && hoptrace topics ensure"]
    environment: *env
  payment-service:
    image: hoptrace
    command: ["worker", "payment-service"]
    environment:
      <<: *env
  purchase-worker:
    image: hoptrace
    command: ["worker", "purchase-worker"]
  allocator:
    image: hoptrace
    command: hoptrace worker allocation-worker
  session-worker:
    image: hoptrace
    command: ["worker", "session-worker"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "compose.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_complete_compose_file_passes(tmp_path: Path) -> None:
    report = check_deploy(write(tmp_path, FULL), SPEC)
    assert report.ok, report.problems
    assert report.services["allocation-worker"] == "allocator"
    assert set(report.topics) == set(SPEC.topics)


def test_missing_worker_and_missing_topics_are_listed_precisely(tmp_path: Path) -> None:
    text = FULL.replace(
        "  allocator:\n    image: hoptrace\n    command: hoptrace worker allocation-worker\n", ""
    )
    text = text.replace("hoptrace migrate && hoptrace topics ensure", "hoptrace migrate")
    report = check_deploy(write(tmp_path, text), SPEC)
    assert not report.ok
    assert any(
        "trainer.allocated: service allocation-worker is not deployed" in p for p in report.problems
    )
    missing_topics = [p for p in report.problems if "is not created" in p]
    assert len(missing_topics) == len(SPEC.topics)
    assert any(p.startswith("dead-letter topic purchase-created.dlq") for p in missing_topics)


def test_explicit_kafka_topics_commands_count_and_the_rest_is_missing(tmp_path: Path) -> None:
    creates = " && ".join(
        f"kafka-topics.sh --bootstrap-server kafka:9092 --create --topic {t} --partitions 3"
        for t in SPEC.topics
        if t != "purchase-created"
    )
    text = FULL.replace("hoptrace migrate && hoptrace topics ensure", creates)
    report = check_deploy(write(tmp_path, text), SPEC)
    assert [p for p in report.problems] == [
        "topic purchase-created is not created (no `hoptrace topics ensure` service and no "
        "`kafka-topics --create --topic purchase-created`)"
    ]


def test_wrong_group_fault_and_group_override_are_reported(tmp_path: Path) -> None:
    text = FULL.replace(
        "    command: hoptrace worker allocation-worker\n",
        "    command: hoptrace worker allocation-worker\n    environment:\n"
        "      HOPTRACE_FAULT: wrong-group\n",
    ).replace(
        '    command: ["worker", "session-worker"]\n',
        '    command: ["worker", "session-worker"]\n    environment:\n'
        "      - HOPTRACE_CONSUMER_GROUP=sessions-old\n",
    )
    report = check_deploy(write(tmp_path, text), SPEC, GROUP_FAULTS)
    assert len(report.problems) == 2, report.problems
    assert "allocator runs with fault wrong-group" in report.problems[0]
    assert "HOPTRACE_CONSUMER_GROUP=sessions-old" in report.problems[1]


def test_scaled_to_zero_and_profiles_count_as_not_deployed(tmp_path: Path) -> None:
    text = FULL.replace(
        '    command: ["worker", "purchase-worker"]\n',
        '    command: ["worker", "purchase-worker"]\n    deploy:\n      replicas: 0\n',
    ).replace(
        '    command: ["worker", "session-worker"]\n',
        '    command: ["worker", "session-worker"]\n    profiles: ["extra"]\n',
    )
    problems = check_deploy(write(tmp_path, text), SPEC).problems
    assert problems == [
        "step purchase.created: service purchase-worker is scaled to 0 replicas",
        "step session.created: service session-worker only starts with profile(s) extra",
    ]


def test_topics_ensure_for_another_pipeline_does_not_count(tmp_path: Path) -> None:
    text = FULL.replace("/app/pipelines/payments.toml", "/app/pipelines/other.toml")
    report = check_deploy(write(tmp_path, text), SPEC)
    assert any("another pipeline" in p for p in report.problems)
    assert any("is not created" in p for p in report.problems)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ComposeError):
        check_deploy(tmp_path / "nope.yml", SPEC)
    with pytest.raises(ComposeError):
        check_deploy(write(tmp_path, "services: [1, 2"), SPEC)


def run_cli(
    *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "HOPTRACE_PIPELINE": str(PROJECT_ROOT / "pipelines" / "payments.toml")}
    return subprocess.run(
        [sys.executable, "-m", "hoptrace.cli", "check", "deploy", *args],
        capture_output=True,
        text=True,
        env={**env, **(env_extra or {})},
        timeout=60,
    )


def test_cli_exit_codes(tmp_path: Path) -> None:
    good = run_cli("--compose", str(write(tmp_path, FULL)))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("ok:")
    bad = tmp_path / "bad.yml"
    bad.write_text(textwrap.dedent(FULL).replace("hoptrace topics ensure", "true"))
    out = run_cli("--compose", str(bad))
    assert out.returncode == 1
    assert "topic purchase-confirmed is not created" in out.stdout
    assert run_cli("--compose", str(tmp_path / "absent.yml")).returncode == 2


def test_the_repository_compose_file_deploys_the_reference_pipeline() -> None:
    report = check_deploy(PROJECT_ROOT / "docker-compose.yml", SPEC)
    assert report.ok, report.problems
