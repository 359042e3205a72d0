"""Which spans are a pipeline's steps, and which correlation a span belongs to.

The one rule the collector applies at ingest (correlation state, stalls, alerts, funnel) and at
lookup (diagnosis, dashboard):

* **hoptrace's own step span**: it carries ``hoptrace.step`` naming a step of the spec (and, when
  it names a pipeline, this pipeline's name), and it is the step span: it reports an outcome
  (``hoptrace.step.outcome``) or it is named after the step.
* **a span hoptrace did not make** (standard OpenTelemetry instrumentation, any language; a
  service set up by hoptrace's instrumentation says so in its resource, and only its step spans
  count) counts
  for step S when it is a consumer/process span of S's service (resource ``service.name``) on S's
  consumed topic — in S's group when the span names a group and several steps of that service
  consume the topic —, or, for a step that consumes nothing (a producer-only first step), a
  producer span of S's service to S's emitted topic. The messaging attributes are read in every
  spelling SDKs use (``conventions.DESTINATION_KEYS`` ...). A receive span (the poll that fetched
  a batch) is not a step run; its per-record process span is.
* **the correlation id** comes from the carriers the spec declares, in order (the baggage
  attribute ``hoptrace.correlation_id``, named attributes, the Kafka message key); a span with
  none inherits the id of another span of its trace (resolved by the collector, which sees the
  trace).
* **a step run's outcome**: hoptrace's spans say it (``ok``, ``duplicate``, ``error``); any
  other span is ``error`` when it or one of its descendants has status ERROR, else ``ok``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hoptrace.ids import is_valid_correlation_id

from .causes import Outcome
from .conventions import (
    ATTR_OUTCOME,
    ATTR_PIPELINE,
    ATTR_STEP,
    CONSUME_OPERATIONS,
    DESTINATION_KEYS,
    DISTRO_NAME,
    GROUP_KEYS,
    MESSAGE_KEY_KEYS,
    OFFSET_KEYS,
    OPERATION_KEYS,
    PARTITION_KEYS,
    PRODUCE_OPERATIONS,
    RESOURCE_DISTRO_NAME,
    STATUS_ERROR,
    Operation,
    SpanKind,
)
from .spec import PipelineSpec, Step


def first_attr(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The value of the first of ``keys`` that is set (not None, not empty)."""
    for key in keys:
        value = attributes.get(key)
        if value is not None and value != "":
            return value
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class Messaging:
    """A span's messaging facts, whatever the spelling: topic, group, operation, partition,
    offset, message key (None where the span does not say)."""

    destination: str | None
    group: str | None
    operation: str | None
    partition: int | None = None
    offset: int | None = None
    key: str | None = None

    @classmethod
    def of(cls, attributes: Mapping[str, Any]) -> Messaging:
        return cls(
            destination=_text(first_attr(attributes, DESTINATION_KEYS)),
            group=_text(first_attr(attributes, GROUP_KEYS)),
            operation=_text(first_attr(attributes, OPERATION_KEYS)),
            partition=_int(first_attr(attributes, PARTITION_KEYS)),
            offset=_int(first_attr(attributes, OFFSET_KEYS)),
            key=_text(first_attr(attributes, MESSAGE_KEY_KEYS)),
        )


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def is_consume(kind: int, operation: str | None) -> bool:
    """A span that handled a consumed record (not the poll that fetched it)."""
    if operation is not None:
        return operation in CONSUME_OPERATIONS and operation != Operation.RECEIVE
    return kind == SpanKind.CONSUMER


def is_produce(kind: int, operation: str | None) -> bool:
    if operation is not None:
        return operation in PRODUCE_OPERATIONS
    return kind == SpanKind.PRODUCER


class StepMatcher:
    """The spec's steps, indexed for matching spans (build once per spec, use per span)."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.ids = frozenset(s.id for s in spec.steps)
        self._consumers: dict[tuple[str, str], tuple[Step, ...]] = {}
        self._producers: dict[tuple[str, str], Step] = {}
        for step in spec.steps:
            if step.consumes:
                key = (step.service, step.consumes)
                self._consumers[key] = (*self._consumers.get(key, ()), step)
            elif step.emits:
                self._producers[(step.service, step.emits)] = step
        carriers = spec.correlation
        self.cid_keys: tuple[str, ...] = carriers.attribute_keys + (
            MESSAGE_KEY_KEYS if carriers.message_key else ()
        )

    # -------------------------------------------------------------------- hoptrace's spans

    def own_step(
        self,
        step: Any,
        name: str,
        outcome: Any = None,
        pipeline: Any = None,
    ) -> str | None:
        """The step of one of hoptrace's step spans (``hoptrace.step`` = ``step``), or None."""
        if step is None or step not in self.ids:
            return None
        if pipeline is not None and pipeline != self.spec.name:
            return None
        if outcome is None and name != step:
            return None
        return str(step)

    # -------------------------------------------------------------------- any span

    def messaging_step(
        self,
        service: str,
        kind: int,
        destination: str | None,
        group: str | None,
        operation: str | None,
    ) -> str | None:
        """The step a span hoptrace did not make is a run of, from its service and messaging
        facts, or None."""
        if not destination:
            return None
        if is_consume(kind, operation):
            steps = self._consumers.get((service, destination))
            if not steps:
                return None
            if len(steps) == 1:
                return steps[0].id
            for step in steps:  # one service consuming a topic as several steps: by group
                if group is not None and step.group == group:
                    return step.id
            return None
        if is_produce(kind, operation):
            producer = self._producers.get((service, destination))
            return producer.id if producer is not None else None
        return None

    def step_of(
        self,
        service: str,
        kind: int,
        name: str,
        attributes: Mapping[str, Any],
        resource: Mapping[str, Any] | None = None,
        step: Any = None,
        outcome: Any = None,
    ) -> str | None:
        """The step a stored span is a run of (hoptrace's own rule first), or None.
        ``step``/``outcome``: the span's stored step/outcome columns when the caller has them."""
        own = self.own_step(
            step if step is not None else attributes.get(ATTR_STEP),
            name,
            outcome if outcome is not None else attributes.get(ATTR_OUTCOME),
            attributes.get(ATTR_PIPELINE),
        )
        if own is not None or attributes.get(ATTR_STEP) is not None or reports_itself(resource):
            return own
        m = Messaging.of(attributes)
        return self.messaging_step(service, kind, m.destination, m.group, m.operation)

    def correlation_id(self, attributes: Mapping[str, Any]) -> str | None:
        """The correlation id a span carries (the spec's carriers, in order), or None."""
        for key in self.cid_keys:
            value = attributes.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if isinstance(value, str) and is_valid_correlation_id(value):
                return value
        return None


def reports_itself(resource: Mapping[str, Any] | None) -> bool:
    """A service set up by hoptrace's instrumentation (its steps are its step spans)."""
    return resource is not None and resource.get(RESOURCE_DISTRO_NAME) == DISTRO_NAME


def run_outcome(outcome: Any, status_code: int, failed_below: bool = False) -> str:
    """A step run's outcome: hoptrace's own when the span reports one, else ``error`` when the
    span or a descendant (``failed_below``) has status ERROR, else ``ok``."""
    if outcome in (Outcome.OK, Outcome.DUPLICATE, Outcome.ERROR):
        return str(outcome)
    return Outcome.ERROR.value if status_code == STATUS_ERROR or failed_below else Outcome.OK.value
