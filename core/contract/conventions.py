"""Span conventions: the attribute names and values hoptrace writes and reads, the OpenTelemetry
messaging semantic-convention names in every spelling SDKs use, and the Kafka header and envelope
names that carry a correlation across a hop.

Services write these (``hoptrace.instrumentation``), the collector and the dashboard read them;
nobody else spells them.
"""

from __future__ import annotations

from enum import IntEnum

# ------------------------------------------------------------------------ correlation carriers

#: W3C baggage key, and the span attribute every span of a correlation carries (copied from
#: baggage by a baggage span processor).
BAGGAGE_KEY = "hoptrace.correlation_id"
ATTR_CORRELATION_ID = BAGGAGE_KEY

#: Kafka headers every record hoptrace emits carries (they survive an uninstrumented hop).
CORRELATION_HEADER = "x-correlation-id"
EVENT_ID_HEADER = "x-event-id"
EVENT_TYPE_HEADER = "x-event-type"
#: W3C trace-context and baggage headers (what propagators inject into a record's headers).
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})

# ------------------------------------------------------------------------ hoptrace's step span

ATTR_PIPELINE = "hoptrace.pipeline"
ATTR_STEP = "hoptrace.step"
ATTR_OUTCOME = "hoptrace.step.outcome"
ATTR_EVENT_ID = "hoptrace.event.id"
ATTR_EVENT_TYPE = "hoptrace.event.type"
ATTR_ATTEMPTS = "hoptrace.attempts"  # set when a record took more than one attempt
ATTR_ATTEMPT = "hoptrace.attempt"  # on an exception event: which attempt raised it
ATTR_DLQ_TOPIC = "hoptrace.dlq.topic"
ATTR_ERROR_REASON = "hoptrace.error.reason"
#: The record this step emitted (always set on emit, also on a consuming step's span, whose
#: messaging.* attributes describe the CONSUMED record).
ATTR_EMIT_TOPIC = "hoptrace.emit.topic"
ATTR_EMIT_PARTITION = "hoptrace.emit.partition"
ATTR_EMIT_OFFSET = "hoptrace.emit.offset"
ATTR_EMIT_EVENT_ID = "hoptrace.emit.event_id"
#: Emit attributes, current spelling first (``hoptrace.emitted.*``: an early spelling).
EMIT_TOPIC_KEYS = (ATTR_EMIT_TOPIC, "hoptrace.emitted.topic")
EMIT_PARTITION_KEYS = (ATTR_EMIT_PARTITION, "hoptrace.emitted.partition")
EMIT_OFFSET_KEYS = (ATTR_EMIT_OFFSET, "hoptrace.emitted.offset")
#: A span may name a failed downstream call itself.
ATTR_DOWNSTREAM = "hoptrace.downstream"
DOWNSTREAM_KEYS = ("hoptrace.error.kind", "hoptrace.error.type", "error.type")

# ------------------------------------------------------------------------ messaging semconv

#: Written by hoptrace (the current semantic-convention names).
MSG_SYSTEM = "messaging.system"
MSG_DESTINATION = "messaging.destination.name"
MSG_PARTITION = "messaging.destination.partition.id"
MSG_OFFSET = "messaging.kafka.offset"
MSG_GROUP = "messaging.consumer.group.name"
MSG_OPERATION_TYPE = "messaging.operation.type"
MSG_OPERATION_NAME = "messaging.operation.name"
MSG_MESSAGE_ID = "messaging.message.id"
MSG_MESSAGE_KEY = "messaging.kafka.message.key"
MSG_CLIENT_ID = "messaging.client.id"
SERVER_ADDRESS = "server.address"
MESSAGING_SYSTEM_KAFKA = "kafka"

#: Read by hoptrace: every spelling in use across SDK versions and languages, current first.
DESTINATION_KEYS = (MSG_DESTINATION, "messaging.destination")
GROUP_KEYS = (MSG_GROUP, "messaging.kafka.consumer.group", "messaging.kafka.consumer_group")
OPERATION_KEYS = (MSG_OPERATION_TYPE, "messaging.operation")
MESSAGE_KEY_KEYS = (MSG_MESSAGE_KEY, "messaging.kafka.message_key")
PARTITION_KEYS = (
    MSG_PARTITION,
    "messaging.kafka.destination.partition",
    "messaging.kafka.partition",
)
OFFSET_KEYS = (MSG_OFFSET, "messaging.kafka.message.offset")


class Operation:
    """``messaging.operation.type`` values (and the older ``messaging.operation`` ones)."""

    PROCESS = "process"
    RECEIVE = "receive"
    SEND = "send"
    PUBLISH = "publish"
    CREATE = "create"
    DELIVER = "deliver"  # an old name of process


#: Operations that mean "this span handled a consumed record" / "this span produced one".
CONSUME_OPERATIONS = frozenset({Operation.PROCESS, Operation.RECEIVE, Operation.DELIVER})
PRODUCE_OPERATIONS = frozenset({Operation.SEND, Operation.PUBLISH, Operation.CREATE})

# ------------------------------------------------------------------------ other semconv read

RESOURCE_SERVICE_NAME = "service.name"
UNKNOWN_SERVICE = "unknown_service"
#: hoptrace's instrumentation names itself in this resource attribute: such a service's steps
#: report themselves (hoptrace's step spans), so its other spans are never matched as steps.
RESOURCE_DISTRO_NAME = "telemetry.distro.name"
DISTRO_NAME = "hoptrace"
HTTP_STATUS_KEYS = ("http.response.status_code", "http.status_code")
PEER_KEYS = ("peer.service", "server.address", "url.full", "http.url")
DB_TABLE_KEYS = ("db.sql.table", "db.collection.name")
DB_STATEMENT_KEYS = ("db.query.text", "db.statement")
#: e.g. ``INSERT tutoring_sessions`` (the Java agent's stable database conventions)
DB_SUMMARY = "db.query.summary"
DB_OPERATION_KEYS = ("db.operation.name", "db.operation")
DB_SYSTEM_KEYS = ("db.system.name", "db.system")
EXCEPTION_EVENT = "exception"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"


class SpanKind(IntEnum):
    """OTLP ``Span.kind`` values as stored."""

    UNSPECIFIED = 0
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


#: OTLP ``Status.code`` of a failed span.
STATUS_ERROR = 2

# ------------------------------------------------------------------------ dead-letter records

#: A step's dead-letter topic is its consumed topic plus this suffix.
DLQ_SUFFIX = ".dlq"
DLQ_HEADER_PREFIX = "x-dlq-"
DLQ_REASON_HEADER = "x-dlq-reason"
DLQ_ERROR_HEADER = "x-dlq-error-type"
DLQ_STEP_HEADER = "x-dlq-step"
DLQ_SOURCE_TOPIC_HEADER = "x-dlq-source-topic"
DLQ_SOURCE_PARTITION_HEADER = "x-dlq-source-partition"
DLQ_SOURCE_OFFSET_HEADER = "x-dlq-source-offset"
DLQ_ATTEMPTS_HEADER = "x-dlq-attempts"
DLQ_TRUNCATED_HEADER = "x-dlq-truncated-from"


def dlq_topic(topic: str) -> str:
    """The dead-letter topic of records consumed from ``topic``."""
    return f"{topic}{DLQ_SUFFIX}"


# ------------------------------------------------------------------------ redrives

#: The audit table of ``hoptrace redrive``: one row per applied action (who, when, what, result).
REDRIVES_TABLE = "redrives"
#: On a redrive's span (a new trace, linked to the original): the trace it resumes, and the
#: audit row it belongs to. The span link carries the same trace; the attribute keeps it where a
#: store does not keep links.
ATTR_REDRIVE_ORIGIN_TRACE = "hoptrace.redrive.origin_trace_id"
ATTR_REDRIVE_ACTION = "hoptrace.redrive.action"
#: On a re-published record: the redrive that sent it.
REDRIVE_HEADER = "x-hoptrace-redrive"
