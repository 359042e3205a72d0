"""docker-compose.yml, checked without a Docker engine: compose-go (the loader `docker compose`
uses: JSON schema, interpolation, consistency) accepts it, and its resolved model has every
worker of the reference pipeline, healthchecks, ordered start-up, pinned images, no secrets."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT, Settings

from .gotools import COMPOSE_FILE, ENV_EXAMPLE, clean_env, timeout_for

pytestmark = timeout_for("composecheck", 120)

SPEC = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
PIPELINE_SERVICES = sorted({step.service for step in SPEC.steps} | {"admin-service"})
CONSUMERS = sorted(step.service for step in SPEC.steps if step.consumes)
HOPTRACE_SERVICES = [*PIPELINE_SERVICES, "collector", "dashboard", "init"]
ONE_SHOT = {"init"}
OK_CONDITIONS = {"service_healthy", "service_completed_successfully"}


def run_composecheck(binary: Path, compose: Path, env_file: Path | None = ENV_EXAMPLE):
    args = [str(binary)]
    if env_file is not None:
        args += ["--env-file", str(env_file)]
    return subprocess.run(
        [*args, str(compose)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )


def write_variant(tmp_path: Path, edit) -> Path:
    """A copy of the shipped file (same folder semantics) after ``edit(raw_yaml_dict)``."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    edit(data)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------- the real loader


def test_compose_go_accepts_the_shipped_file(composecheck: Path) -> None:
    proc = run_composecheck(composecheck, COMPOSE_FILE)
    assert proc.returncode == 0, proc.stderr
    for name in HOPTRACE_SERVICES + ["kafka", "postgres", "jaeger", "otel-collector"]:
        assert name in proc.stdout


def test_compose_go_rejects_a_schema_violation(composecheck: Path, tmp_path: Path) -> None:
    """Proves the loader validates: an unknown service key is refused by the compose schema."""
    path = write_variant(
        tmp_path, lambda d: d["services"]["purchase-worker"].update(helthcheck={"test": "x"})
    )
    proc = run_composecheck(composecheck, path)
    assert proc.returncode == 1
    assert "helthcheck" in proc.stderr


def test_compose_go_rejects_depends_on_a_missing_service(
    composecheck: Path, tmp_path: Path
) -> None:
    def edit(d: dict[str, Any]) -> None:
        del d["services"]["admin-service"]

    proc = run_composecheck(composecheck, write_variant(tmp_path, edit))
    assert proc.returncode == 1
    assert "admin-service" in proc.stderr


def test_secrets_are_required_from_the_environment(composecheck: Path) -> None:
    """Without .env the file does not load: every secret is a required ${VAR:?...}."""
    proc = run_composecheck(composecheck, COMPOSE_FILE, env_file=None)
    assert proc.returncode == 1
    for var in ("POSTGRES_PASSWORD", "HOPTRACE_RO_PASSWORD", "HOPTRACE_INGEST_TOKEN"):
        assert f"required variable {var} is missing" in proc.stderr
    for var in ("HOPTRACE_DB_PASSWORD", "HOPTRACE_OTLP_TOKEN"):
        assert f"required variable {var} is missing" in proc.stderr


# --------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", PIPELINE_SERVICES)
def test_every_pipeline_service_is_deployed(services: dict[str, Any], name: str) -> None:
    svc = services.get(name)
    assert svc is not None, f"{name} is not in docker-compose.yml"
    assert svc["command"] == ["worker", name]
    env = svc["environment"]
    assert env["OTEL_SERVICE_NAME"] == name
    assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname == "otel-collector"
    assert env["HOPTRACE_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert urlsplit(env["HOPTRACE_DATABASE_URL"]).hostname == "postgres"
    assert env["HOPTRACE_BIND_HOST"] == "0.0.0.0"


def test_no_worker_overrides_its_consumer_group(services: dict[str, Any]) -> None:
    """Groups come from the pipeline spec the image ships; no fault switch is set."""
    for name in PIPELINE_SERVICES:
        env = services[name]["environment"]
        assert "HOPTRACE_FAULT" not in env
        assert env["HOPTRACE_PIPELINE"] == "/app/pipelines/payments.toml"


def test_hoptrace_env_names_are_settings_fields(services: dict[str, Any]) -> None:
    fields = {
        f.validation_alias if isinstance(f.validation_alias, str) else f"HOPTRACE_{name.upper()}"
        for name, f in Settings.model_fields.items()
    }
    fields.add("HOPTRACE_READY_FILE")  # read by hoptrace.readiness
    for name in HOPTRACE_SERVICES:
        unknown = {k for k in services[name]["environment"] if k.startswith("HOPTRACE_")} - fields
        assert not unknown, f"{name}: not hoptrace settings: {sorted(unknown)}"


def test_init_migrates_then_ensures_topics(services: dict[str, Any]) -> None:
    init = services["init"]
    script = " ".join(init["entrypoint"] + init["command"])
    assert re.search(r"hoptrace migrate\s*&&\s*hoptrace topics ensure", script), script
    assert init.get("restart", "no") == "no"
    for dep in ("kafka", "postgres"):
        assert init["depends_on"][dep]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", [*PIPELINE_SERVICES, "collector"])
def test_pipeline_services_start_after_init(services: dict[str, Any], name: str) -> None:
    deps = services[name]["depends_on"]
    assert deps["init"]["condition"] == "service_completed_successfully"
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["postgres"]["condition"] == "service_healthy"


def test_allocation_worker_waits_for_admin_service(services: dict[str, Any]) -> None:
    deps = services["allocation-worker"]["depends_on"]
    assert deps["admin-service"]["condition"] == "service_healthy"


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        if name in ONE_SHOT:
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name


def test_depends_on_uses_conditions_that_hold(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert spec["condition"] in OK_CONDITIONS, f"{name} -> {dep}: {spec['condition']}"
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for unhealthy-able {dep}"
            else:
                assert dep in ONE_SHOT, f"{name} waits for {dep} to exit, but it runs forever"


@pytest.mark.parametrize("name", [*PIPELINE_SERVICES, "collector", "dashboard"])
def test_restart_policy(services: dict[str, Any], name: str) -> None:
    assert services[name].get("restart") in ("unless-stopped", "always", "on-failure")


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.match(r"^\d+(\.\d+)+", tag), f"{name}: {image} not pinned"


def test_official_images(services: dict[str, Any]) -> None:
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:0.")
    hoptrace_images = {services[n]["image"] for n in HOPTRACE_SERVICES}
    assert len(hoptrace_images) == 1, hoptrace_images
    for name in HOPTRACE_SERVICES:
        assert services[name]["build"]["dockerfile"] == "Dockerfile"


def test_kafka_is_kraft_without_auto_topic_creation(services: dict[str, Any]) -> None:
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_published_ports(services: dict[str, Any]) -> None:
    def published(name: str) -> set[tuple[int, int]]:
        return {(int(p["published"]), p["target"]) for p in services[name].get("ports", [])}

    assert (16686, 16686) in published("jaeger")
    assert (8501, 8501) in published("dashboard")
    assert (8081, 8081) in published("payment-service")
    for name, svc in services.items():  # never published on every interface by default
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"


def test_otel_collector_fans_out_to_jaeger_and_hoptrace(services: dict[str, Any]) -> None:
    otel = services["otel-collector"]
    assert otel["environment"]["JAEGER_OTLP_ENDPOINT"] == "jaeger:4317"
    assert otel["environment"]["HOPTRACE_OTLP_ENDPOINT"] == "collector:4317"
    mounts = {v["target"]: Path(v["source"]) for v in otel["volumes"]}
    assert (
        mounts["/etc/otelcol-contrib/config.yaml"] == PROJECT_ROOT / "collector/otelcol-config.yaml"
    )
    assert "--config=/etc/otelcol-contrib/config.yaml" in otel["command"]


def test_bind_mount_sources_exist(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            if vol["type"] == "bind":
                assert Path(vol["source"]).exists(), f"{name}: {vol['source']} missing"


# --------------------------------------------------------------------- secrets


SECRET_KEY = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY)", re.I)


def test_no_secret_literals_in_the_file() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())

    def envs():
        yield "x-hoptrace-env", raw["x-hoptrace-env"]
        for name, value in raw.items():  # every other environment fragment (x-...)
            if name.startswith("x-") and name.endswith(("-env", "-db", "-export")):
                yield name, value
        for name, svc in raw["services"].items():
            env = svc.get("environment")
            if isinstance(env, dict):
                yield name, env

    for where, env in envs():
        for key, value in env.items():
            if value is None or not isinstance(value, str):
                continue
            if SECRET_KEY.search(key):
                assert value.startswith("${") and value.endswith("}"), f"{where}.{key}={value!r}"
            parts = urlsplit(value) if "://" in value else None
            if parts and parts.password:
                assert parts.password.startswith("${"), f"{where}.{key}: password in URL"


def test_env_example_defines_every_required_variable() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert {"POSTGRES_PASSWORD", "HOPTRACE_INGEST_TOKEN"} <= required
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    assert required <= set(example), required - set(example)
    for key in required:
        assert "change-me" in example[key], f"{key} in .env.example must be a placeholder"


def test_env_file_is_kept_out_of_the_image() -> None:
    dockerignore = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert ".env" in dockerignore and ".env.*" in dockerignore


# --------------------------------------------------------------------- who holds which secret


def _secrets(env: dict[str, Any]) -> set[str]:
    """Which secrets an environment carries: the tokens, and each database role's URL."""
    out = {k for k in ("HOPTRACE_INGEST_TOKEN", "HOPTRACE_OTLP_TOKEN") if k in env}
    if "authorization=Bearer" in (env.get("OTEL_EXPORTER_OTLP_HEADERS") or ""):
        out.add("otlp-token-header")
    for key in ("HOPTRACE_DATABASE_URL", "HOPTRACE_DASHBOARD_DATABASE_URL"):
        if env.get(key):
            out.add(f"{key}:{urlsplit(env[key]).username}")
    return out


def test_the_dashboard_gets_only_the_read_only_url(services: dict[str, Any]) -> None:
    assert _secrets(services["dashboard"]["environment"]) == {
        "HOPTRACE_DASHBOARD_DATABASE_URL:hoptrace_ro"
    }


def test_each_process_gets_only_the_secrets_it_needs(services: dict[str, Any]) -> None:
    owner = "HOPTRACE_DATABASE_URL:hoptrace"
    for name in PIPELINE_SERVICES:  # they write their tables and export to the OTel Collector
        assert _secrets(services[name]["environment"]) == {owner, "otlp-token-header"}, name
    assert _secrets(services["collector"]["environment"]) == {owner, "HOPTRACE_INGEST_TOKEN"}
    # init holds them all: its start refuses a placeholder before anything of hoptrace starts
    assert _secrets(services["init"]["environment"]) == {
        owner,
        "otlp-token-header",
        "HOPTRACE_INGEST_TOKEN",
        "HOPTRACE_DASHBOARD_DATABASE_URL:hoptrace_ro",
    }
    otel = services["otel-collector"]["environment"]
    assert _secrets(otel) == {"HOPTRACE_INGEST_TOKEN", "HOPTRACE_OTLP_TOKEN"}
    header = services["purchase-worker"]["environment"]["OTEL_EXPORTER_OTLP_HEADERS"]
    assert header == f"authorization=Bearer%20{otel['HOPTRACE_OTLP_TOKEN']}"


def test_everything_of_hoptrace_waits_for_init(services: dict[str, Any]) -> None:
    """init refuses placeholder secrets: what runs without it must wait for it (directly or
    through the collector), the OTel Collector included (its receivers' token is one)."""

    def waits_for_init(name: str, seen: frozenset[str] = frozenset()) -> bool:
        deps = services[name].get("depends_on") or {}
        return "init" in deps or any(
            waits_for_init(d, seen | {name}) for d in deps if d not in seen
        )

    for name in [*PIPELINE_SERVICES, "collector", "dashboard", "otel-collector"]:
        assert waits_for_init(name), name


def test_postgres_owner_is_not_the_superuser(services: dict[str, Any]) -> None:
    pg = services["postgres"]
    assert pg["environment"]["POSTGRES_USER"] != "hoptrace"  # the image makes it a superuser
    mounts = {v["target"]: Path(v["source"]) for v in pg["volumes"] if v["type"] == "bind"}
    init_dir = mounts["/docker-entrypoint-initdb.d"]
    assert (init_dir / "10-hoptrace-roles.sh").exists()
    for name in [*PIPELINE_SERVICES, "collector", "init"]:
        url = urlsplit(services[name]["environment"]["HOPTRACE_DATABASE_URL"])
        assert url.username == "hoptrace", name


def test_the_connection_pools_fit_the_servers_connections(services: dict[str, Any]) -> None:
    """The pools' maxima (from the code) and the short-lived connections stay well under what
    PostgreSQL gives roles that are no superuser (max_connections - 3 reserved)."""
    import inspect

    from hoptrace.collector import store
    from hoptrace.workers import admin_service, payment_service, tuning

    command = " ".join(services["postgres"]["command"])
    max_connections = int(re.search(r"max_connections=(\d+)", command).group(1))
    writers = Settings().writers
    pools = {
        "hop workers": len(CONSUMERS) * tuning.DEFAULT_CONSUMERS * (tuning.MAX_LANES + 1),
        "payment-service": payment_service.POOL_SIZE,
        "admin-service": admin_service.POOL_SIZE,
        "collector": writers + 4 + 1 + 4,  # writer pool, the stall scanner, evidence pool
        "dashboard": inspect.signature(store.connect).parameters["max_size"].default,
    }
    total = sum(pools.values())
    assert total == 87, pools  # the sum docker-compose.yml and docs/docker.md state
    short_lived = 1 + len(PIPELINE_SERVICES) + 1 + 4  # migrations, `hoptrace trace`
    assert total + short_lived <= (max_connections - 3) // 2, (pools, max_connections)
    assert "= 87" in COMPOSE_FILE.read_text()


# --------------------------------------------------------------------- commands the image runs


def hoptrace_commands(services: dict[str, Any]) -> dict[str, list[list[str]]]:
    """Per hoptrace service, the `hoptrace ...` argument lists it runs."""
    out: dict[str, list[list[str]]] = {}
    for name in HOPTRACE_SERVICES:
        svc = services[name]
        if svc.get("entrypoint"):  # a shell line: `hoptrace a && hoptrace b`
            line = " ".join(svc["command"])
            out[name] = [part.split()[1:] for part in line.split("&&")]
            assert all(part.split()[0] == "hoptrace" for part in line.split("&&")), line
        else:
            out[name] = [svc["command"]]
    return out


def test_every_hoptrace_command_parses(services: dict[str, Any]) -> None:
    """The image's ENTRYPOINT is `hoptrace`: each service's arguments are a real command."""
    from typer.testing import CliRunner

    from hoptrace.cli import app

    for name, commands in hoptrace_commands(services).items():
        for args in commands:
            res = CliRunner().invoke(app, [*args, "--help"])
            assert res.exit_code == 0, f"{name}: hoptrace {' '.join(args)}: {res.output}"


def test_worker_names_are_services_of_hoptrace_worker(services: dict[str, Any]) -> None:
    from hoptrace.workers.registry import SERVICES

    for name in PIPELINE_SERVICES:
        assert services[name]["command"][1] in SERVICES


def test_healthchecks_probe_the_ports_the_services_listen_on(services: dict[str, Any]) -> None:
    defaults = Settings()
    expected = {
        "payment-service": f"http://127.0.0.1:{defaults.payment_service_port}/healthz",
        "admin-service": f"http://127.0.0.1:{defaults.admin_service_port}/healthz",
        # the collector's readiness (database reachable, queue below its cap)
        "collector": f"http://127.0.0.1:{defaults.otlp_http_port}/readyz",
        "dashboard": "http://127.0.0.1:8501/_stcore/health",
    }
    for name, url in expected.items():
        assert url in " ".join(services[name]["healthcheck"]["test"]), name
    assert services["dashboard"]["command"] == ["dashboard", "--port", "8501"]
    for name in CONSUMERS:
        ready = services[name]["environment"]["HOPTRACE_READY_FILE"]
        assert services[name]["healthcheck"]["test"] == ["CMD", "test", "-f", ready]
