"""Span attribute names and values (DESIGN.md "Span conventions"); the collector matches these."""

from __future__ import annotations

from .envelope import BAGGAGE_KEY

ATTR_CORRELATION_ID = BAGGAGE_KEY  # "hoptrace.correlation_id"
ATTR_PIPELINE = "hoptrace.pipeline"
ATTR_STEP = "hoptrace.step"
ATTR_OUTCOME = "hoptrace.step.outcome"
ATTR_EVENT_ID = "hoptrace.event.id"
ATTR_EVENT_TYPE = "hoptrace.event.type"
ATTR_ATTEMPTS = "hoptrace.attempts"  # set when a record took more than one attempt
ATTR_DLQ_TOPIC = "hoptrace.dlq.topic"
ATTR_ERROR_REASON = "hoptrace.error.reason"
# The record this step emitted (always set on emit, also on a consuming step's span, whose
# messaging.* attributes describe the CONSUMED record).
ATTR_EMIT_TOPIC = "hoptrace.emit.topic"
ATTR_EMIT_PARTITION = "hoptrace.emit.partition"
ATTR_EMIT_OFFSET = "hoptrace.emit.offset"
ATTR_EMIT_EVENT_ID = "hoptrace.emit.event_id"

# messaging semantic conventions (consume side on a hop's span; emit side on a producer-only
# step's span, e.g. payment-service)
MSG_SYSTEM = "messaging.system"
MSG_DESTINATION = "messaging.destination.name"
MSG_PARTITION = "messaging.destination.partition.id"
MSG_OFFSET = "messaging.kafka.offset"
MSG_GROUP = "messaging.consumer.group.name"
MSG_OPERATION_TYPE = "messaging.operation.type"
MSG_MESSAGE_ID = "messaging.message.id"

OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
OUTCOME_DUPLICATE = "duplicate"

# Dead-letter record headers
DLQ_REASON_HEADER = "x-dlq-reason"
DLQ_ERROR_HEADER = "x-dlq-error-type"
DLQ_STEP_HEADER = "x-dlq-step"
DLQ_SOURCE_TOPIC_HEADER = "x-dlq-source-topic"
DLQ_SOURCE_PARTITION_HEADER = "x-dlq-source-partition"
DLQ_SOURCE_OFFSET_HEADER = "x-dlq-source-offset"
DLQ_ATTEMPTS_HEADER = "x-dlq-attempts"
