"""Where the local stack lives and how it is reached: :class:`StackConfig` (its folder, ports,
jar cache and start timeout, from :class:`~hoptrace.settings.DevSettings`), the PostgreSQL roles
it creates, and :class:`StackError`, the one-line failure every part raises.

The folder (``HOPTRACE_HOME``, default ``.hoptrace/``)::

    cache/kafka-<version>/libs   broker jars resolved by Maven from Maven Central (reused)
    pg/                          PostgreSQL data directory (owned by a non-root system user)
    pg-superuser.password        the cluster superuser's password (drawn at initdb; 0600)
    kafka/                       KRaft log directory
    logs/<part>.log              one log file per part
    run/<part>.pid               pid files: `dev down` stops exactly these, nothing else
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hoptrace.settings import (
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


class StackError(RuntimeError):
    """One clear line: what is wrong and what to do."""


def initialising_marker(folder: Path) -> Path:
    """A sibling file ``<folder>.initialising`` is written before we create a data folder and
    removed once it is complete: a folder that still has one is a half-initialised folder of
    ours, which we may remove and redo. Any other unexpected folder is left alone."""
    return folder.with_name(folder.name + ".initialising")


@dataclass(frozen=True)
class StackConfig:
    home: Path = PROJECT_ROOT / ".hoptrace"
    cache: Path | None = None
    pg_port: int = LOCAL_PG_PORT
    kafka_port: int = LOCAL_KAFKA_PORT
    controller_port: int = LOCAL_KAFKA_CONTROLLER_PORT
    timeout: float = 90.0

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
        return f"127.0.0.1:{self.kafka_port}"
