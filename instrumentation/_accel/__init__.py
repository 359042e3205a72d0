"""Every speed-up of ``hoptrace.instrumentation`` that reaches into a library's private API, in
one place, behind one switch and a version check each.

A speed-up makes the same spans as the libraries' public API for less CPU per hop, by relying on
something a library does not promise (a private attribute, an override of an internal method, a
wrapper's ``__wrapped__``). So each is used only when

* the switch allows it: ``HOPTRACE_ACCEL`` (default on; ``0`` turns every speed-up off, see
  ``hoptrace.instrumentation.settings``), and
* every library it reaches into is installed at a version its differential test ran against
  (:data:`TESTED`, read with ``importlib.metadata``).

Otherwise the caller takes the plain path (the library's public API) by itself, and ONE log line
per speed-up says which one is off and why. The speed-ups and their plain paths:

========================  ====================================  ================================
speed-up                  here                                  plain path
========================  ====================================  ================================
``lean_spans``            ``lean_spans.LeanTracerProvider``     the SDK's ``TracerProvider``
``asyncpg_spans``         ``asyncpg_spans`` (cached span info,  the stock ``AsyncPGInstrumentor``;
                          bookkeeping past the wrapper)         bookkeeping under suppression
``otlp``                  ``otlp`` (native-encoder exporters)   the SDK's OTLP exporters
``aiokafka``              ``aiokafka`` (one-step send span,     the instrumentation's wrappers
                          wrapper bypasses)                     (under suppression)
``http_transport``        ``http`` (httpcore pool on asyncio    httpx's ``AsyncClient``
                          streams, idle single-connection
                          transports)
========================  ====================================  ================================

``tests/instrumentation/test_accel_differential.py`` runs the same hops with the switch on and
off and compares the exported spans field by field; each module's own test compares it with
the library it replaces.

Nothing outside ``hoptrace.instrumentation`` imports this package.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from enum import StrEnum

log = logging.getLogger(__name__)


class Speedup(StrEnum):
    """The speed-ups (each a module of this package)."""

    LEAN_SPANS = "lean_spans"
    ASYNCPG_SPANS = "asyncpg_spans"
    OTLP = "otlp"
    AIOKAFKA = "aiokafka"
    HTTP_TRANSPORT = "http_transport"


#: The library versions each speed-up's differential test ran against (the ones it relies on
#: the private parts of). Add a version here only after the tests passed with it.
TESTED: dict[Speedup, dict[str, frozenset[str]]] = {
    Speedup.LEAN_SPANS: {"opentelemetry-sdk": frozenset({"1.45.1"})},
    Speedup.ASYNCPG_SPANS: {
        "opentelemetry-instrumentation-asyncpg": frozenset({"0.66b1"}),
        "asyncpg": frozenset({"0.32.0"}),
        "wrapt": frozenset({"2.5.2"}),
    },
    Speedup.OTLP: {
        "opentelemetry-exporter-otlp-proto-grpc": frozenset({"1.45.1"}),
        "opentelemetry-exporter-otlp-proto-http": frozenset({"1.45.1"}),
    },
    Speedup.AIOKAFKA: {
        "aiokafka": frozenset({"0.14.0"}),
        "opentelemetry-instrumentation-aiokafka": frozenset({"0.66b1"}),
        "wrapt": frozenset({"2.5.2"}),
    },
    Speedup.HTTP_TRANSPORT: {
        "httpx": frozenset({"0.28.1"}),
        "httpcore": frozenset({"1.0.9"}),
    },
}

#: What each speed-up falls back to (said in its log line).
PLAIN_PATH: dict[Speedup, str] = {
    Speedup.LEAN_SPANS: "the SDK's TracerProvider",
    Speedup.ASYNCPG_SPANS: "the stock AsyncPGInstrumentor and suppressed bookkeeping",
    Speedup.OTLP: "the SDK's OTLP exporters",
    Speedup.AIOKAFKA: "the aiokafka instrumentation's wrappers",
    Speedup.HTTP_TRANSPORT: "httpx's AsyncClient",
}


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def why_off(speedup: Speedup) -> str | None:
    """Why ``speedup`` cannot be used here (None: it can): the switch, or the first library
    installed at a version its differential test did not run against."""
    from ..settings import instrumentation_settings

    if not instrumentation_settings().accel:
        return "HOPTRACE_ACCEL=0"
    for dist, versions in TESTED[speedup].items():
        have = _installed(dist)
        if have not in versions:
            tested = ", ".join(sorted(versions))
            return f"{dist} {have or '(not installed)'} is not a tested version ({tested})"
    return None


@functools.cache
def enabled(speedup: Speedup) -> bool:
    """True when ``speedup`` is used in this process (decided once; logs one line when not)."""
    reason = why_off(speedup)
    if reason is not None:
        level = logging.INFO if reason == "HOPTRACE_ACCEL=0" else logging.WARNING
        log.log(
            level,
            "hoptrace speed-up %s is off (%s): using %s",
            speedup,
            reason,
            PLAIN_PATH[speedup],
        )
    return reason is None


__all__ = ["PLAIN_PATH", "TESTED", "Speedup", "enabled", "why_off"]
