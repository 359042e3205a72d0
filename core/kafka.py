"""How every Kafka client of hoptrace is configured, in one place: :func:`client_options` turns
:class:`~hoptrace.settings.KafkaSettings` (``HOPTRACE_KAFKA_*``: bootstrap servers, security
protocol, SASL mechanism and login, the CA file) into aiokafka's options; the hop runtime's
consumer and producer, the collector's span source and evidence clients, `hoptrace topics
ensure`, the workers' topic check and redrive all take their options from here, so a managed
Kafka (SASL_SSL with SCRAM, say) is one set of variables for every process.

A client that cannot start only says "Unable to bootstrap" (aiokafka logs the reason and raises
a generic error): :func:`connection_problem` opens one connection itself and names the cause
(the broker refused the SASL login, the mechanism is not enabled, the TLS handshake failed,
nothing listens), and :func:`explain` wraps a failed start into :class:`KafkaUnavailable` with
that sentence.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from hoptrace.settings import KafkaConfigError, KafkaSettings

__all__ = [
    "KafkaConfigError",
    "KafkaUnavailable",
    "client_options",
    "connection_problem",
    "explain",
    "kafka_settings",
]

#: Seconds :func:`connection_problem` gives one connection attempt.
PROBE_TIMEOUT_S = 5.0


class KafkaUnavailable(KafkaError):
    """A Kafka client could not start; the message says why (see :func:`explain`)."""

    def __str__(self) -> str:  # the sentence alone (KafkaError prefixes its class name)
        return str(self.args[0]) if self.args else "Kafka unavailable"


def kafka_settings() -> KafkaSettings:
    """The Kafka settings from the environment, read now (not cached: tests change it)."""
    return KafkaSettings()


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    ca = settings.kafka_ca_file
    if ca is not None and not ca.is_file():
        raise KafkaConfigError(f"HOPTRACE_KAFKA_CA_FILE={ca}: no such file")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (ssl.SSLError, OSError) as exc:
        raise KafkaConfigError(f"HOPTRACE_KAFKA_CA_FILE={ca}: not a PEM CA file ({exc})") from None
    return context


def client_options(settings: KafkaSettings | None = None) -> dict[str, Any]:
    """aiokafka options (``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``,
    ``sasl_plain_password``, ``ssl_context``) for ``settings`` (default: the environment's),
    without ``bootstrap_servers``. PLAINTEXT gives ``{"security_protocol": "PLAINTEXT"}``.
    :class:`KafkaConfigError` when the settings cannot work."""
    s = settings if settings is not None else kafka_settings()
    protocol = s.kafka_security_protocol
    opts: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = _ssl_context(s)
    elif s.kafka_ca_file is not None:
        raise KafkaConfigError(
            f"HOPTRACE_KAFKA_CA_FILE is set but HOPTRACE_KAFKA_SECURITY_PROTOCOL={protocol} uses "
            "no TLS; use SSL or SASL_SSL"
        )
    if protocol.startswith("SASL_"):
        password = s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else ""
        if not s.kafka_sasl_username or not password:
            raise KafkaConfigError(
                f"HOPTRACE_KAFKA_SECURITY_PROTOCOL={protocol} needs HOPTRACE_KAFKA_SASL_USERNAME "
                "and HOPTRACE_KAFKA_SASL_PASSWORD"
            )
        opts.update(
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=password,
        )
    return opts


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


async def _probe(host: str, port: int, settings: KafkaSettings) -> str | None:
    from aiokafka.conn import create_conn  # aiokafka's own connection set-up, SASL included

    opts = client_options(settings)
    where = f"{host}:{port}"
    try:
        conn = await asyncio.wait_for(
            create_conn(host, port, request_timeout_ms=int(PROBE_TIMEOUT_S * 1000), **opts),
            PROBE_TIMEOUT_S,
        )
    except SaslAuthenticationFailed as exc:
        return (
            f"Kafka at {where} refused the SASL login of user {settings.kafka_sasl_username!r} "
            f"({settings.kafka_sasl_mechanism}): {_text(exc)}; check HOPTRACE_KAFKA_SASL_USERNAME "
            "and HOPTRACE_KAFKA_SASL_PASSWORD"
        )
    except UnsupportedSaslMechanismError as exc:
        return (
            f"Kafka at {where} does not enable SASL mechanism {settings.kafka_sasl_mechanism} "
            f"({_text(exc)}); set HOPTRACE_KAFKA_SASL_MECHANISM to one it enables"
        )
    except ssl.SSLError as exc:
        return (
            f"the TLS handshake with Kafka at {where} failed ({_text(exc)}); check "
            "HOPTRACE_KAFKA_CA_FILE and that the listener speaks TLS"
        )
    except ConnectionRefusedError:
        return f"nothing listens at {where} (HOPTRACE_KAFKA_BOOTSTRAP)"
    except TimeoutError:
        return (
            f"Kafka at {where} did not answer within {PROBE_TIMEOUT_S:g}s (a listener expecting "
            f"another protocol than HOPTRACE_KAFKA_SECURITY_PROTOCOL="
            f"{settings.kafka_security_protocol}? a firewall?)"
        )
    except (KafkaConnectionError, ConnectionError, OSError) as exc:
        return (
            f"Kafka at {where} closed the connection during the handshake ({_text(exc)}): does "
            f"the listener expect another protocol than HOPTRACE_KAFKA_SECURITY_PROTOCOL="
            f"{settings.kafka_security_protocol}?"
        )
    except KafkaError as exc:
        return f"Kafka at {where}: {_text(exc)}"
    try:  # a listener may answer ApiVersions before any login: ask what a client asks next
        await asyncio.wait_for(conn.send(MetadataRequest([])), PROBE_TIMEOUT_S)
    except (KafkaError, OSError, TimeoutError) as exc:
        return (
            f"Kafka at {where} accepted the connection but refused a metadata request "
            f"({_text(exc)}): does the listener expect another protocol than "
            f"HOPTRACE_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}?"
        )
    finally:
        conn.close()
    return None


def _text(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    if not text:
        return name
    return text if name in text else f"{name}: {text}"


async def connection_problem(settings: KafkaSettings | None = None) -> str | None:
    """One sentence saying why a client with ``settings`` cannot connect (tried on each
    bootstrap server, the first answer that works wins), or None when a connection with the
    handshake (TLS, SASL) succeeds. The password never appears in it."""
    s = settings if settings is not None else kafka_settings()
    try:
        client_options(s)
    except KafkaConfigError as exc:
        return str(exc)
    hosts = _hosts(s.kafka_bootstrap)
    if not hosts:
        return f"HOPTRACE_KAFKA_BOOTSTRAP={s.kafka_bootstrap!r} names no host:port"
    problems = []
    for host, port in hosts:
        problem = await _probe(host, port, s)
        if problem is None:
            return None
        problems.append(problem)
    return "; ".join(problems)


async def explain(exc: BaseException, settings: KafkaSettings | None = None) -> KafkaUnavailable:
    """A failed client start as :class:`KafkaUnavailable` whose message says why (a probe
    connection's answer), falling back to the original error's text."""
    try:
        problem = await connection_problem(settings)
    except Exception:  # noqa: BLE001 - the explanation is best effort
        problem = None
    s = settings if settings is not None else kafka_settings()
    return KafkaUnavailable(problem or f"cannot reach Kafka at {s.kafka_bootstrap} ({_text(exc)})")
