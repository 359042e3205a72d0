"""Settings that decide how hoptrace runs outside a checkout and against a secured Kafka:

* the reference spec ships in the package (a copy of ``pipelines/payments.toml``, kept equal);
  in a checkout ``HOPTRACE_PIPELINE`` defaults to it; outside one the collector and "your
  pipeline" commands need it (one clear error), the reference services fall back to the package's
  copy;
* ``HOPTRACE_JAEGER_URL`` unset means no Jaeger: no link anywhere (trace output, alerts);
* ``HOPTRACE_KAFKA_*`` become one set of client options (:func:`hoptrace.kafka.client_options`);
  settings that cannot work are refused with the variable to fix.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import certifi
import pytest

from hoptrace import settings as settings_module
from hoptrace.collector.alerts import Targets, alert_body
from hoptrace.contract import SpecError
from hoptrace.kafka import KafkaConfigError, client_options
from hoptrace.settings import (
    PACKAGED_SPEC,
    PROJECT_ROOT,
    KafkaSettings,
    Settings,
    WorkerSettings,
    placeholder_secrets,
)


def test_the_packaged_reference_spec_is_the_checkout_s() -> None:
    assert (
        PACKAGED_SPEC.read_bytes() == (PROJECT_ROOT / "pipelines" / "payments.toml").read_bytes()
    ), (
        "core/pipelines/payments.toml (package data) differs from pipelines/payments.toml: "
        "copy the reference spec over"
    )


def test_the_spec_default_in_and_outside_a_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOPTRACE_PIPELINE", raising=False)
    assert Settings().pipeline == PROJECT_ROOT / "pipelines" / "payments.toml"
    assert Settings(pipeline="/srv/shop.toml").pipeline == Path("/srv/shop.toml")
    monkeypatch.setattr(settings_module, "IN_CHECKOUT", False)
    with pytest.raises(SpecError) as err:
        _ = Settings().pipeline
    assert "HOPTRACE_PIPELINE is not set" in str(err.value)
    assert str(PACKAGED_SPEC) in str(err.value)  # says where the reference spec is
    assert WorkerSettings().pipeline == PACKAGED_SPEC
    monkeypatch.setenv("HOPTRACE_PIPELINE", "/srv/shop.toml")
    assert Settings().pipeline == WorkerSettings().pipeline == Path("/srv/shop.toml")


def test_no_jaeger_url_means_no_link(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOPTRACE_JAEGER_URL", raising=False)
    assert Settings().jaeger_url is None
    monkeypatch.setenv("HOPTRACE_JAEGER_URL", " ")
    assert Settings().jaeger_url is None
    alert = {"correlation_id": "p-1", "trace_id": "ab" * 16, "status": "firing", "fired_at": None}
    body = alert_body(alert, Targets(None, None, "http://dash", None))
    assert "jaeger_url" not in body["annotations"]
    body = alert_body(alert, Targets(None, None, "http://dash", "http://j:16686"))
    assert body["annotations"]["jaeger_url"] == f"http://j:16686/trace/{'ab' * 16}"


def test_plaintext_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SECURITY_PROTOCOL", "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD", "CA_FILE"):
        monkeypatch.delenv(f"HOPTRACE_KAFKA_{key}", raising=False)
    assert client_options() == {"security_protocol": "PLAINTEXT"}


def test_sasl_scram_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOPTRACE_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
    monkeypatch.setenv("HOPTRACE_KAFKA_SASL_MECHANISM", "scram-sha-256")
    monkeypatch.setenv("HOPTRACE_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("HOPTRACE_KAFKA_SASL_PASSWORD", "pw")
    assert client_options() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
    }
    assert "pw" not in repr(Settings())  # the password is a secret in every repr


def test_sasl_ssl_verifies_with_the_ca_file() -> None:
    opts = client_options(
        KafkaSettings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_username="svc",
            kafka_sasl_password="pw",
            kafka_ca_file=Path(certifi.where()),
        )
    )
    ctx = opts["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs()  # the file's CAs, loaded
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"  # the default mechanism


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs HOPTRACE_KAFKA_SASL_USERNAME"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ca_file": Path("/nonexistent/ca.pem")},
            "HOPTRACE_KAFKA_CA_FILE=/nonexistent/ca.pem: no such file",
        ),
        ({"kafka_ca_file": Path(certifi.where())}, "uses no TLS"),
    ],
)
def test_settings_that_cannot_work_name_the_variable(values: dict, says: str) -> None:
    with pytest.raises(KafkaConfigError) as err:
        client_options(KafkaSettings(**values))
    assert says in str(err.value)


def test_a_ca_file_that_is_no_pem_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(KafkaConfigError, match="not a PEM CA file"):
        client_options(KafkaSettings(kafka_security_protocol="SSL", kafka_ca_file=bad))


def test_the_sasl_password_placeholder_stops_every_command() -> None:
    assert placeholder_secrets({"HOPTRACE_KAFKA_SASL_PASSWORD": "change-me-kafka"}) == [
        "HOPTRACE_KAFKA_SASL_PASSWORD"
    ]
