"""Configuration from the environment (``HOPTRACE_*``), with defaults that point at the local stack.

:class:`Settings` holds what several components share (:func:`get_settings`); a component with
knobs of its own reads them through its own class: :class:`KafkaSettings` (how every Kafka client
reaches the broker: bootstrap and security; :mod:`hoptrace.kafka` turns them into client
options), :class:`WorkerSettings` (the reference services), :class:`DevSettings` (the local
stack), :class:`ProcessSettings` (what `hoptrace dev` tells a process it starts).

The pipeline spec (``HOPTRACE_PIPELINE``): in a checkout its default is the reference spec
``pipelines/payments.toml``; an installed package has no default for the collector and the
commands that read "your" pipeline (a clear error, :func:`pipeline_not_set`, when it is unset),
while the reference services (:class:`WorkerSettings`) and `hoptrace dev` fall back to the
reference spec shipped in the package (:data:`PACKAGED_SPEC`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Repository root when running from a checkout (``core/`` lives directly under it); in an
#: installed package, the folder holding the ``hoptrace`` package (nothing of the repository).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: Running from a checkout (an editable install or the source tree), not an installed wheel.
IN_CHECKOUT = (
    Path(__file__).resolve().parent.name == "core" and (PROJECT_ROOT / "pyproject.toml").is_file()
)
#: The reference pipeline's spec in a checkout (tests and the local stack use it).
CHECKOUT_SPEC = PROJECT_ROOT / "pipelines" / "payments.toml"
#: The same spec shipped inside the package (package data): the reference services' default
#: outside a checkout. ``tests/foundation`` checks that it equals ``pipelines/payments.toml``.
PACKAGED_SPEC = Path(__file__).resolve().parent / "pipelines" / "payments.toml"
#: The local stack's folder: ``.hoptrace`` in a checkout, ``~/.hoptrace`` for an installed package.
DEFAULT_HOME = PROJECT_ROOT / ".hoptrace" if IN_CHECKOUT else Path.home() / ".hoptrace"

#: Local stack ports: non-default on purpose, so a system Postgres or Kafka never collides.
LOCAL_PG_PORT = 55432
LOCAL_KAFKA_PORT = 59092
LOCAL_KAFKA_CONTROLLER_PORT = 59093
LOCAL_JAEGER_PORT = 16686
#: The local stack's database as its owner role and as the dashboard's read-only role.
LOCAL_DATABASE_URL = f"postgresql://hoptrace:hoptrace@127.0.0.1:{LOCAL_PG_PORT}/hoptrace"
LOCAL_READONLY_DATABASE_URL = (
    f"postgresql://hoptrace_ro:hoptrace_ro@127.0.0.1:{LOCAL_PG_PORT}/hoptrace"
)


class MissingDashboardDatabaseUrl(ValueError):
    """The dashboard has no read-only database URL (it never derives one from the owner's)."""


class KafkaConfigError(ValueError):
    """The Kafka settings cannot make a client (e.g. SASL without a username, a missing CA
    file): one line naming the variable to fix (:func:`hoptrace.kafka.client_options`)."""


def _spec_error() -> type[Exception]:
    from hoptrace.contract import SpecError  # lazy: settings load before anything else

    return SpecError


def pipeline_not_set() -> Exception:
    """The clear error of a command that needs the pipeline spec when ``HOPTRACE_PIPELINE`` is
    unset outside a checkout (a :class:`~hoptrace.contract.SpecError`: every command prints it
    as one line and exits 2)."""
    return _spec_error()(
        "HOPTRACE_PIPELINE is not set and no pipeline spec was found (this is an installed "
        "package, not a checkout): set HOPTRACE_PIPELINE to your pipeline's spec file, e.g. "
        "export HOPTRACE_PIPELINE=/etc/hoptrace/shop.toml (the reference pipeline's spec ships "
        f"with the package: {PACKAGED_SPEC})"
    )


#: What .env.example puts in every secret (docker-compose.yml): never a real one.
PLACEHOLDER = "change-me"
#: Variables holding a secret as a whole (a token, or headers carrying one) ...
_SECRET_VALUES = (
    "HOPTRACE_INGEST_TOKEN",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "HOPTRACE_KAFKA_SASL_PASSWORD",
)
#: ... and database URLs, whose password is the secret.
_SECRET_URLS = ("HOPTRACE_DATABASE_URL", "HOPTRACE_DASHBOARD_DATABASE_URL")


def placeholder_secrets(environ: Mapping[str, str]) -> list[str]:
    """The names of the variables in ``environ`` whose secret is still the .env.example
    placeholder (``change-me...``): a process must not start with one."""
    found = [name for name in _SECRET_VALUES if PLACEHOLDER in unquote(environ.get(name, ""))]
    for name in _SECRET_URLS:
        try:
            password = urlsplit(environ.get(name, "")).password or ""
        except ValueError:
            continue
        if PLACEHOLDER in unquote(password):
            found.append(name)
    return found


#: Kafka security protocols and SASL mechanisms hoptrace's clients support (aiokafka's).
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(BaseSettings):
    """How every Kafka client of hoptrace reaches the broker (``HOPTRACE_KAFKA_*``): the
    bootstrap servers, the security protocol, the SASL login and the CA file that signs the
    brokers' TLS certificates. :func:`hoptrace.kafka.client_options` turns them into a client's
    options; :class:`Settings` includes them."""

    model_config = SettingsConfigDict(env_prefix="HOPTRACE_", extra="ignore")

    kafka_bootstrap: str = Field(default=f"127.0.0.1:{LOCAL_KAFKA_PORT}")
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        default="PLAINTEXT",
        description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (as Kafka's security.protocol).",
    )
    kafka_sasl_mechanism: KafkaSaslMechanism = Field(
        default="SCRAM-SHA-512", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ca_file: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that sign the brokers' certificates (SSL, SASL_SSL); "
        "default: the system's trust store.",
    )

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value


class Settings(KafkaSettings):
    """Every knob hoptrace reads. Each field maps to ``HOPTRACE_<NAME>``; the pipeline spec is
    :attr:`pipeline` (``HOPTRACE_PIPELINE``, see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix="HOPTRACE_", extra="ignore", populate_by_name=True)

    def __init__(self, **values: Any) -> None:
        if "pipeline" in values:  # Settings(pipeline=...) as before the spec became a property
            values["pipeline_file"] = values.pop("pipeline")
        super().__init__(**values)

    database_url: str = Field(
        default=LOCAL_DATABASE_URL,
        description="PostgreSQL for the span store and the reference pipeline's tables.",
    )
    dashboard_database_url: str | None = Field(
        default=None,
        description="Read-only role for the dashboard; required once HOPTRACE_DATABASE_URL is "
        "set (see readonly_database_url).",
    )
    pipeline_file: Path | None = Field(
        default=None,
        validation_alias="HOPTRACE_PIPELINE",
        description="The pipeline spec file (read it through Settings.pipeline).",
    )
    alert_webhook_url: str | None = None
    alertmanager_url: str | None = None
    ingest_token: str | None = None
    jaeger_url: str | None = Field(
        default=None,
        description="Jaeger's UI (e.g. http://127.0.0.1:16686): trace links in `hoptrace "
        "trace`, alerts and the dashboard; unset, no link is printed.",
    )
    dashboard_url: str = "http://127.0.0.1:8501"
    retention: str = Field(default="7d", description="How long spans are kept, e.g. 7d, 36h.")
    home: Path = Field(
        default=DEFAULT_HOME,
        description="Ignored folder for the local stack: binaries, data, logs, pids.",
    )
    bind_host: str = "127.0.0.1"
    otlp_grpc_port: int = 4317
    otlp_http_port: int = 4318
    dashboard_port: int = 8501
    payment_service_port: int = 8081
    admin_service_port: int = 8082
    payment_service_url: str | None = Field(
        default=None,
        description="payment-service base URL; default http://<bind_host>:<payment_service_port>.",
    )
    admin_service_url: str | None = Field(
        default=None,
        description="admin-service base URL; default http://<bind_host>:<admin_service_port>.",
    )
    worker_consumers: int | None = Field(
        default=None,
        ge=1,
        description="Kafka consumers per worker process (default 1: it handles its partitions concurrently).",
    )
    # collector (write side)
    span_topic: str | None = Field(default=None, description="Kafka topic of OTLP span records.")
    span_group: str = "hoptrace-collector"
    stall_scan_interval: float = Field(default=1.0, description="Seconds between stall scans.")
    stall_grace: float = Field(
        default=15.0,
        ge=0,
        description="Seconds a scanner taking over after a gap without scans waits for the spans "
        "the SDKs held before judging the deadlines that passed in the gap (and a collector whose "
        "span intake was behind waits as long after it caught up).",
    )
    max_body_bytes: int = Field(default=16 * 1024 * 1024, description="OTLP request size cap.")
    queue_max_spans: int = Field(default=50_000, description="Receive->write queue bound.")
    write_batch_spans: int = 5000
    writers: int = 2

    @field_validator("jaeger_url", mode="before")
    @classmethod
    def _blank_url_is_none(cls, value: object) -> object:
        return (value.strip() or None) if isinstance(value, str) else value

    @property
    def pipeline(self) -> Path:
        """The pipeline spec file: ``HOPTRACE_PIPELINE``; in a checkout the reference spec
        when it is unset; otherwise :func:`pipeline_not_set` (raised)."""
        if self.pipeline_file is not None:
            return self.pipeline_file
        if IN_CHECKOUT:
            return CHECKOUT_SPEC
        raise pipeline_not_set()

    def readonly_database_url(self) -> str:
        """The dashboard's database URL: ``HOPTRACE_DASHBOARD_DATABASE_URL``; the local stack's
        read-only role when ``HOPTRACE_DATABASE_URL`` is not set either (both point at the
        local stack); otherwise :class:`MissingDashboardDatabaseUrl`. Nothing is derived from
        the owner's URL: a guess that misses would connect the dashboard as the owner."""
        if self.dashboard_database_url:
            return self.dashboard_database_url
        if "database_url" not in self.model_fields_set:
            return LOCAL_READONLY_DATABASE_URL
        raise MissingDashboardDatabaseUrl(
            "HOPTRACE_DASHBOARD_DATABASE_URL is not set: the dashboard reads with a read-only "
            "role and never derives its URL from HOPTRACE_DATABASE_URL (the owner's); set it, "
            "e.g. postgresql://hoptrace_ro:PASSWORD@HOST:5432/hoptrace"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


class WorkerSettings(Settings):
    """The reference services (`hoptrace worker NAME`): the shared settings plus the fault
    switch; their pipeline defaults to the reference spec (the package's copy outside a
    checkout)."""

    @property
    def pipeline(self) -> Path:
        if self.pipeline_file is not None:
            return self.pipeline_file
        return CHECKOUT_SPEC if IN_CHECKOUT else PACKAGED_SPEC

    fault: str | None = Field(
        default=None,
        description="Fault switch of the service (see `hoptrace.workers.faults`); empty: none.",
    )
    slow_delay_s: float = Field(
        default=3.0, ge=0, description="Seconds the `slow` fault waits before each record."
    )

    @field_validator("fault", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return (value.strip() or None) if isinstance(value, str) else value


@lru_cache(maxsize=1)
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()


class DevSettings(BaseSettings):
    """The local stack (`hoptrace dev`): ``HOPTRACE_HOME`` moves its whole folder;
    ``HOPTRACE_DEV_*`` move its ports and the jar cache (tests run a second, private stack beside
    the shared one)."""

    model_config = SettingsConfigDict(
        env_prefix="HOPTRACE_DEV_", extra="ignore", env_ignore_empty=True
    )

    home: Path = Field(default=DEFAULT_HOME, validation_alias="HOPTRACE_HOME")
    cache: Path | None = Field(default=None, description="Jar cache; default <home>/cache.")
    pg_port: int = LOCAL_PG_PORT
    kafka_port: int = LOCAL_KAFKA_PORT
    controller_port: int = LOCAL_KAFKA_CONTROLLER_PORT
    kafka_sasl_port: int | None = Field(
        default=None,
        description="Also listen with SASL_PLAINTEXT (SCRAM-SHA-256/512) on this port; the "
        "stack's processes then use it. Only for a Kafka folder formatted with it.",
    )
    jaeger_port: int = Field(default=LOCAL_JAEGER_PORT, description="Jaeger's UI and API.")
    jaeger_grpc_port: int = Field(default=16685, description="Jaeger's query gRPC API.")
    jaeger_otlp_port: int = Field(default=14317, description="Jaeger's OTLP gRPC receiver.")
    tools_bin: Path | None = Field(
        default=None,
        validation_alias="HOPTRACE_TOOLS_BIN",
        description="Where scripts/go-tools.sh put the Go tools (Jaeger); default "
        "<home>/tools/bin, else the checkout's .hoptrace/tools/bin.",
    )
    timeout: float = Field(default=90.0, gt=0, description="Seconds a part may take to be ready.")


class ApiClientSettings(BaseSettings):
    """Where the CLI and the dashboard read through a collector's read API instead of the
    database and Kafka (read when asked, not cached: tests change the environment)."""

    model_config = SettingsConfigDict(
        env_prefix="HOPTRACE_", extra="ignore", env_ignore_empty=True, str_strip_whitespace=True
    )

    api_url: str | None = Field(
        default=None, description="The collector's HTTP base; set: reads go through /api/v1."
    )
    api_token: str | None = Field(default=None, description="Bearer token for the read API.")


class RedriveSettings(BaseSettings):
    """The redrive route's token (the collector serves ``POST /redrive`` only with one), where
    the dashboard reaches it, and who a redrive is recorded as."""

    model_config = SettingsConfigDict(
        env_prefix="HOPTRACE_", extra="ignore", env_ignore_empty=True, str_strip_whitespace=True
    )

    redrive_url: str | None = Field(default=None, description="The collector's HTTP base.")
    redrive_token: str | None = Field(default=None, description="Bearer token of the route.")
    redrive_who: str | None = Field(default=None, description="Recorded as who redrove.")

    @property
    def dashboard_can_redrive(self) -> bool:
        return bool(self.redrive_url and self.redrive_token)


class ProcessSettings(BaseSettings):
    """Set by `hoptrace dev` (or a compose file) for a process it starts."""

    model_config = SettingsConfigDict(env_prefix="HOPTRACE_", extra="ignore", env_ignore_empty=True)

    ready_file: Path | None = Field(
        default=None, description="Touched once the process can do its job (readiness)."
    )
