"""The instrumentation's own settings (``HOPTRACE_*`` variables a traced process reads), in one
pydantic-settings class instead of ``os.environ`` look-ups spread over the modules.

``HOPTRACE_ACCEL`` (default on; ``0``/``false`` turns it off) is the one switch of every
speed-up in ``hoptrace.instrumentation._accel``: off, each falls back to the libraries' public
API (the same spans, more CPU per hop). ``HOPTRACE_EXPORT_HOLD_S`` is how long a failed span
batch is held and retried; ``HOPTRACE_EXPORT_STATS_DIR`` where each process writes its export
counters after every export; ``HOPTRACE_EXPORT_ALSO`` more OTLP endpoints that get every span
too (best effort).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

#: How long a failed batch is held by default (seconds).
DEFAULT_EXPORT_HOLD_S = 60.0


class InstrumentationSettings(BaseSettings):
    """What a traced process reads from ``HOPTRACE_<NAME>`` (read when needed, not cached:
    tests and tools change the environment between set-ups)."""

    model_config = SettingsConfigDict(env_prefix="HOPTRACE_", extra="ignore")

    accel: bool = Field(
        default=True,
        description="The speed-ups in hoptrace.instrumentation._accel (0: the libraries' "
        "public API everywhere; same spans, more CPU).",
    )
    export_hold_s: float = Field(
        default=DEFAULT_EXPORT_HOLD_S,
        ge=0,
        description="Seconds a failed span batch is held and retried (0 drops it at once).",
    )
    export_stats_dir: Path | None = Field(
        default=None,
        description="Folder where each process writes export_stats() after every export.",
    )
    export_also: str | None = Field(
        default=None,
        description="More OTLP gRPC endpoints (comma-separated) that get every span too, best "
        "effort (the local stack sets its Jaeger's).",
    )


def instrumentation_settings() -> InstrumentationSettings:
    """The current settings; a malformed variable is logged and its default used (tracing
    never stops a service from starting)."""
    try:
        return InstrumentationSettings()
    except ValidationError as exc:
        bad = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
        log.warning("instrumentation settings: ignoring malformed %s", ", ".join(sorted(bad)))
        defaults = {n: InstrumentationSettings.model_fields[n].default for n in bad}
        return InstrumentationSettings(**defaults)  # init values win over the environment
