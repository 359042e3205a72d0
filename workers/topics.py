"""`hoptrace topics ensure`: create the pipeline's topics and dead-letter topics from the spec,
with the spec's partitions and replication factor. Idempotent; the only way topics appear
(the broker's auto-creation is off). Its admin client connects with the Kafka security
settings (``HOPTRACE_KAFKA_*``, :mod:`hoptrace.kafka`); one that cannot connect says why."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from hoptrace.contract import PipelineSpec, SpecError, load_spec
from hoptrace.kafka import KafkaConfigError, client_options, explain


@dataclass(frozen=True)
class TopicResult:
    topic: str
    created: bool
    partitions: int | None = None


async def ensure_topics(
    bootstrap: str,
    spec: PipelineSpec,
    timeout_s: float = 20.0,
    *,
    options: Mapping[str, Any] | None = None,
) -> list[TopicResult]:
    """Create every topic of ``spec`` that does not exist yet; report each one. ``options``:
    the client's security options (default: :func:`~hoptrace.kafka.client_options` of the
    environment)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(timeout_s * 1000),
        **(client_options() if options is None else options),
    )
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in spec.topics if t not in existing]
        created: set[str] = set()
        if missing:
            new = [
                NewTopic(
                    t, num_partitions=spec.partitions, replication_factor=spec.replication_factor
                )
                for t in missing
            ]
            try:
                resp = await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:  # a concurrent ensure won the race
                resp = None
            errors = {}
            if resp is not None:
                for item in getattr(resp, "topic_errors", []) or []:
                    topic, code = item[0], item[1]
                    if code == 0:
                        created.add(topic)
                    elif code != TopicAlreadyExistsError.errno:
                        errors[topic] = item[2] if len(item) > 2 else f"error code {code}"
            if errors:
                detail = "; ".join(f"{t}: {e}" for t, e in errors.items())
                raise KafkaError(f"could not create topics: {detail}")
        desc = await admin.describe_topics(spec.topics)
        parts = {d["topic"]: len(d.get("partitions") or []) for d in desc}
        return [TopicResult(t, t in created, parts.get(t)) for t in spec.topics]
    finally:
        await admin.close()


def ensure_cli() -> None:
    """Print one line per topic (created / exists); exit 2 if Kafka or the spec is unusable."""
    import typer

    from hoptrace.settings import get_settings

    settings = get_settings()
    # aiokafka logs each failed connection; the one line below says why, once
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        spec = load_spec(settings.pipeline)
        options = client_options(settings)
        results = asyncio.run(ensure_topics(settings.kafka_bootstrap, spec, options=options))
    except (SpecError, KafkaConfigError) as exc:
        typer.echo(f"hoptrace: {exc}", err=True)
        raise typer.Exit(2) from None
    except (KafkaError, OSError, TimeoutError) as exc:
        why = str(asyncio.run(explain(exc, settings)))
        if "nothing listens" in why:
            why += "; the local stack: `hoptrace dev up --infra-only`"
        typer.echo(f"hoptrace: cannot reach Kafka: {why}", err=True)
        raise typer.Exit(2) from None
    for r in results:
        state = "created" if r.created else "exists"
        note = ""
        if r.partitions is not None and r.partitions != spec.partitions:
            note = f" (has {r.partitions} partitions, spec says {spec.partitions})"
        typer.echo(f"{r.topic:<40} {state}{note}")
