"""`hoptrace check deploy --compose FILE` (the CLI, as users run it) passes on the shipped
docker-compose.yml and fails, with a precise message, on the incident's mistakes: a worker left
out, topics never created, a worker on the wrong consumer group. Each broken variant is still a
valid compose file (compose-go accepts it): only the deploy check catches it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT

from .gotools import COMPOSE_FILE, ENV_EXAMPLE, clean_env, timeout_for

pytestmark = timeout_for("composecheck", 120)

HOPTRACE = str(Path(sys.executable).parent / "hoptrace")
SPEC_PATH = PROJECT_ROOT / "pipelines" / "payments.toml"
SPEC = load_spec(SPEC_PATH)


def check_deploy(compose: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOPTRACE_")}
    env["HOPTRACE_PIPELINE"] = str(SPEC_PATH)
    return subprocess.run(
        [HOPTRACE, "check", "deploy", "--compose", str(compose)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def variant(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    edit(data)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def assert_valid_compose(composecheck: Path, path: Path) -> None:
    proc = subprocess.run(
        [str(composecheck), "--env-file", str(ENV_EXAMPLE), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert proc.returncode == 0, f"the variant should be valid compose: {proc.stderr}"


def test_passes_on_the_shipped_file() -> None:
    proc = check_deploy(COMPOSE_FILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps, topics = len(SPEC.steps), len(SPEC.topics)
    assert f"{steps} step services deployed, {topics} topics created" in proc.stdout
    assert proc.stdout.startswith("ok:")


@pytest.mark.parametrize("service", ["purchase-worker", "allocation-worker", "session-worker"])
def test_fails_when_a_worker_is_removed(tmp_path: Path, composecheck: Path, service: str) -> None:
    path = variant(tmp_path, lambda d: d["services"].pop(service))
    assert_valid_compose(composecheck, path)
    proc = check_deploy(path)
    assert proc.returncode == 1, proc.stdout
    step = SPEC.step_for_service(service)
    assert (
        f"step {step.id}: service {service} is not deployed (no compose service named {service} "
        f"and none runs `hoptrace worker {service}`)"
    ) in proc.stdout
    assert proc.stdout.startswith("1 problem(s):"), proc.stdout


def test_fails_when_the_topics_are_not_created(tmp_path: Path, composecheck: Path) -> None:
    """`init` only migrates: no service runs `hoptrace topics ensure`."""

    def edit(d: dict[str, Any]) -> None:
        d["services"]["init"]["command"] = ["hoptrace migrate"]

    path = variant(tmp_path, edit)
    assert_valid_compose(composecheck, path)
    proc = check_deploy(path)
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout.startswith(f"{len(SPEC.topics)} problem(s):"), proc.stdout
    for topic in SPEC.topics:
        kind = "dead-letter topic" if topic.endswith(".dlq") else "topic"
        assert (
            f"{kind} {topic} is not created (no `hoptrace topics ensure` service and no "
            f"`kafka-topics --create --topic {topic}`)"
        ) in proc.stdout


def test_fails_naming_the_one_topic_left_out(tmp_path: Path, composecheck: Path) -> None:
    """Topics created by hand, one forgotten: exactly that one is reported."""
    missing = "purchase-created"
    create = " && ".join(
        f"/opt/kafka/bin/kafka-topics.sh --bootstrap-server kafka:9092 --create --topic {t}"
        for t in SPEC.topics
        if t != missing
    )

    def edit(d: dict[str, Any]) -> None:
        d["services"]["init"]["command"] = [f"hoptrace migrate && {create}"]

    path = variant(tmp_path, edit)
    assert_valid_compose(composecheck, path)
    proc = check_deploy(path)
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout.startswith("1 problem(s):"), proc.stdout
    assert f"topic {missing} is not created" in proc.stdout


def test_fails_when_a_worker_runs_under_the_wrong_consumer_group(
    tmp_path: Path, composecheck: Path
) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["services"]["allocation-worker"]["environment"]["HOPTRACE_FAULT"] = "wrong-group"

    path = variant(tmp_path, edit)
    assert_valid_compose(composecheck, path)
    proc = check_deploy(path)
    assert proc.returncode == 1, proc.stdout
    step = SPEC.step_for_service("allocation-worker")
    assert (
        f"step {step.id}: service allocation-worker runs with fault wrong-group (consumer group "
        f"{step.group}-v2 instead of {step.group})"
    ) in proc.stdout


def test_fails_when_a_worker_sets_another_group(tmp_path: Path, composecheck: Path) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["services"]["session-worker"]["environment"]["KAFKA_CONSUMER_GROUP"] = "sessions-old"

    path = variant(tmp_path, edit)
    assert_valid_compose(composecheck, path)
    proc = check_deploy(path)
    assert proc.returncode == 1, proc.stdout
    step = SPEC.step_for_service("session-worker")
    assert (
        f"step {step.id}: service session-worker sets KAFKA_CONSUMER_GROUP=sessions-old, the "
        f"spec's consumer group is {step.group}"
    ) in proc.stdout


def test_unreadable_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "docker-compose.yml"
    path.write_text("services: [unclosed\n")
    proc = check_deploy(path)
    assert proc.returncode == 2
    assert "not valid YAML" in proc.stderr
