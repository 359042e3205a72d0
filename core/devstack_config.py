"""Where the local stack lives and how it is reached: :class:`StackConfig` (its folder, ports,
jar cache and start timeout, from :class:`~hoptrace.settings.DevSettings`), the PostgreSQL roles
it creates, and :class:`StackError`, the one-line failure every part raises.

The folder (``HOPTRACE_HOME``, default ``.hoptrace/``)::

    cache/kafka-<version>/libs   broker jars resolved by Maven from Maven Central (reused)
    pg/                          PostgreSQL data directory (owned by a non-root system user)
    pg-superuser.password        the cluster superuser's password (drawn at initdb; 0600)
    kafka/                       KRaft log directory
    kafka-sasl.password          the SCRAM user's password (drawn at format, with a SASL port; 0600)
    jaeger.yaml                  Jaeger's configuration (when its binary has been built)
    logs/<part>.log              one log file per part
    run/<part>.pid               pid files: `dev down` stops exactly these, nothing else
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hoptrace.settings import (
    DEFAULT_HOME,
    LOCAL_JAEGER_PORT,
    LOCAL_KAFKA_CONTROLLER_PORT,
    LOCAL_KAFKA_PORT,
    LOCAL_PG_PORT,
    PROJECT_ROOT,
    DevSettings,
)

#: Files shipped with the package for the stack (Kafka's Maven POM, its log4j2 configuration).
STACK_FILES = Path(__file__).resolve().parent / "stack"
PG_DB = "hoptrace"
#: The owner role (creates the schema; may create databases and roles, as the tests do; no
#: superuser) and the dashboard's read-only role.
PG_ROLE, PG_PASSWORD = "hoptrace", "hoptrace"
PG_RO_ROLE, PG_RO_PASSWORD = "hoptrace_ro", "hoptrace_ro"
#: The cluster's superuser: provisions the roles and the database, nothing else uses it. Its
#: password is drawn at initdb and kept in ``<home>/pg-superuser.password`` (mode 0600).
PG_SUPERUSER = "postgres"
#: The SCRAM user of a stack with a SASL listener (its password: ``<home>/kafka-sasl.password``).
KAFKA_SASL_USER = "hoptrace"


class StackError(RuntimeError):
    """One clear line: what is wrong and what to do."""


def initialising_marker(folder: Path) -> Path:
    """A sibling file ``<folder>.initialising`` is written before we create a data folder and
    removed once it is complete: a folder that still has one is a half-initialised folder of
    ours, which we may remove and redo. Any other unexpected folder is left alone."""
    return folder.with_name(folder.name + ".initialising")


@dataclass(frozen=True)
class StackConfig:
    home: Path = DEFAULT_HOME
    cache: Path | None = None
    pg_port: int = LOCAL_PG_PORT
    kafka_port: int = LOCAL_KAFKA_PORT
    controller_port: int = LOCAL_KAFKA_CONTROLLER_PORT
    timeout: float = 90.0
    kafka_sasl_port: int | None = None
    jaeger_port: int = LOCAL_JAEGER_PORT
    jaeger_grpc_port: int = 16685
    jaeger_otlp_port: int = 14317
    tools_bin: Path | None = None

    @classmethod
    def from_env(cls) -> StackConfig:
        """From ``HOPTRACE_HOME`` and ``HOPTRACE_DEV_*`` (:class:`~hoptrace.settings.DevSettings`)."""
        s = DevSettings()
        return cls(
            home=s.home,
            cache=s.cache,
            pg_port=s.pg_port,
            kafka_port=s.kafka_port,
            controller_port=s.controller_port,
            timeout=s.timeout,
            kafka_sasl_port=s.kafka_sasl_port,
            jaeger_port=s.jaeger_port,
            jaeger_grpc_port=s.jaeger_grpc_port,
            jaeger_otlp_port=s.jaeger_otlp_port,
            tools_bin=s.tools_bin,
        )

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.home / "cache"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def database_url(self) -> str:
        return f"postgresql://{PG_ROLE}:{PG_PASSWORD}@127.0.0.1:{self.pg_port}/{PG_DB}"

    @property
    def readonly_database_url(self) -> str:
        return f"postgresql://{PG_RO_ROLE}:{PG_RO_PASSWORD}@127.0.0.1:{self.pg_port}/{PG_DB}"

    @property
    def superuser_password_file(self) -> Path:
        return self.home / "pg-superuser.password"

    @property
    def kafka_bootstrap(self) -> str:
        """The PLAINTEXT listener (the stack's own checks use it)."""
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def kafka_sasl_bootstrap(self) -> str | None:
        """The SASL_PLAINTEXT (SCRAM) listener, when the stack has one."""
        return f"127.0.0.1:{self.kafka_sasl_port}" if self.kafka_sasl_port else None

    @property
    def kafka_sasl_password_file(self) -> Path:
        return self.home / "kafka-sasl.password"

    def kafka_sasl_password(self) -> str | None:
        """The SCRAM user's password (None: the stack has no SASL user yet)."""
        try:
            return self.kafka_sasl_password_file.read_text().strip() or None
        except OSError:
            return None

    @property
    def jaeger_binary(self) -> Path:
        """The Jaeger v2 binary `scripts/go-tools.sh jaeger` builds (it may not exist)."""
        candidates = [self.home / "tools" / "bin", PROJECT_ROOT / ".hoptrace" / "tools" / "bin"]
        if self.tools_bin is not None:
            candidates.insert(0, self.tools_bin)
        for folder in candidates:
            if (folder / "jaeger").is_file():
                return folder / "jaeger"
        return candidates[0] / "jaeger"

    @property
    def jaeger_url(self) -> str:
        return f"http://127.0.0.1:{self.jaeger_port}"

    @property
    def jaeger_otlp_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.jaeger_otlp_port}"
