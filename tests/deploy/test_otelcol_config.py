"""collector/otelcol-config.yaml validated by a real OpenTelemetry Collector build
(tools/otelcol: the same component release as the pinned contrib image) with `validate`, plus
the fan-out it must do: OTLP in, to Jaeger and to the hoptrace collector."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .gotools import OTELCOL_CONFIG, OTELCOL_KAFKA_OVERLAY, clean_env, go_tool, timeout_for

pytestmark = timeout_for("otelcol", 120)

ENV = {
    "JAEGER_OTLP_ENDPOINT": "jaeger:4317",
    "HOPTRACE_OTLP_ENDPOINT": "collector:4317",
    "HOPTRACE_INGEST_TOKEN": "test-token",
    "HOPTRACE_OTLP_TOKEN": "test-otlp-token",
    "HOPTRACE_KAFKA_BOOTSTRAP": "kafka:9092",
}


@pytest.fixture(scope="module")
def otelcol() -> Path:
    return go_tool("otelcol")


def validate(binary: Path, *configs: Path, env: dict[str, str] | None = None):
    args = [f"--config={c}" for c in configs]
    return subprocess.run(
        [str(binary), "validate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(ENV if env is None else env),
        check=False,
    )


def test_collector_validates_the_shipped_config(otelcol: Path) -> None:
    proc = validate(otelcol, OTELCOL_CONFIG)
    assert proc.returncode == 0, proc.stderr


def test_collector_validates_the_kafka_span_topic_overlay(otelcol: Path) -> None:
    proc = validate(otelcol, OTELCOL_CONFIG, OTELCOL_KAFKA_OVERLAY)
    assert proc.returncode == 0, proc.stderr


def test_defaults_apply_without_environment(otelcol: Path) -> None:
    """Every ${env:...} either has a default or is not needed to load the file, but for the
    receivers' token: without it the config is refused (an unauthenticated receiver would
    forward anyone's spans to hoptrace with the ingest token; tests/deploy/test_otelcol_auth)."""
    proc = validate(otelcol, OTELCOL_CONFIG, env={"HOPTRACE_OTLP_TOKEN": "t"})
    assert proc.returncode == 0, proc.stderr
    proc = validate(otelcol, OTELCOL_CONFIG, env={})
    assert proc.returncode != 0 and "bearertokenauth" in proc.stderr


def test_collector_rejects_a_broken_variant(otelcol: Path, tmp_path: Path) -> None:
    """Proves `validate` checks: a pipeline naming an undefined exporter is refused."""
    config = yaml.safe_load(OTELCOL_CONFIG.read_text())
    config["service"]["pipelines"]["traces"]["exporters"].append("otlp/nowhere")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    proc = validate(otelcol, broken)
    assert proc.returncode != 0
    assert "otlp/nowhere" in proc.stderr


def test_collector_rejects_a_misspelt_setting(otelcol: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(OTELCOL_CONFIG.read_text())
    config["exporters"]["otlp/jaeger"]["endpiont"] = "jaeger:4317"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    proc = validate(otelcol, broken)
    assert proc.returncode != 0
    assert "endpiont" in proc.stderr


def test_traces_fan_out_to_jaeger_and_hoptrace() -> None:
    config = yaml.safe_load(OTELCOL_CONFIG.read_text())
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert {"otlp/jaeger", "otlp/hoptrace"} <= set(traces["exporters"])
    assert traces["processors"][0] == "memory_limiter" and "batch" in traces["processors"]
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":-0.0.0.0:4317}")  # default: every interface
    assert protocols["http"]["endpoint"].endswith(":-0.0.0.0:4318}")
    hoptrace = config["exporters"]["otlp/hoptrace"]
    assert hoptrace["headers"]["authorization"] == "Bearer ${env:HOPTRACE_INGEST_TOKEN}"


def test_both_receivers_require_the_bearer_token() -> None:
    config = yaml.safe_load(OTELCOL_CONFIG.read_text())
    for protocol in ("grpc", "http"):
        auth = config["receivers"]["otlp"]["protocols"][protocol]["auth"]
        assert auth["authenticator"] == "bearertokenauth/otlp", protocol
    ext = config["extensions"]["bearertokenauth/otlp"]
    assert ext["token"] == "${env:HOPTRACE_OTLP_TOKEN}" and ext.get("scheme", "Bearer") == "Bearer"
    assert "bearertokenauth/otlp" in config["service"]["extensions"]


def test_kafka_span_topic_is_otlp_protobuf() -> None:
    config = yaml.safe_load(OTELCOL_CONFIG.read_text())
    kafka = config["exporters"]["kafka/spans"]
    assert kafka["traces"]["encoding"] == "otlp_proto"
    overlay = yaml.safe_load(OTELCOL_KAFKA_OVERLAY.read_text())
    assert overlay["service"]["pipelines"]["traces/kafka"]["exporters"] == ["kafka/spans"]


def test_validator_matches_the_pinned_image_release(services) -> None:
    """tools/otelcol is built from the release the compose file runs."""
    image = services["otel-collector"]["image"]
    release = image.rsplit(":", 1)[1]  # e.g. 0.140.1
    gomod = (Path(__file__).resolve().parents[2] / "tools" / "otelcol" / "go.mod").read_text()
    minor = release.rsplit(".", 1)[0]  # 0.140
    assert re.search(rf"collector/otelcol v{re.escape(minor)}\.\d+", gomod), image
    assert re.search(rf"exporter/kafkaexporter v{re.escape(release)}\b", gomod), image
