"""Smoke tests of the interop services on the real stack: a Node.js purchase worker (kafkajs + pg,
OpenTelemetry JS auto-instrumentation) and a Java session consumer (kafka-clients + JDBC, the
OpenTelemetry Java agent). Each gets one envelope from a traced upstream producer (W3C
traceparent + baggage headers, as a hoptrace service sends them); the test checks its effect in
the database, its emitted record, its committed offset and the spans an OTLP receiver got.

Every received span is written to ``tests/artifacts/interop-<service>-<case>-spans.json`` and
the service's log to ``tests/artifacts/interop-<service>-<case>.log``. What the spans look like is
what these tests pin down: hoptrace's collector has to recognise them as they are."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from hoptrace.contract import conventions as conv
from hoptrace.instrumentation.envelope import Envelope, next_event_id

from ..support import wait_for
from .harness import ServiceEnv, ServiceError, start
from .probes import (
    Run,
    committed,
    failed_attempts,
    fetch,
    one,
    one_event,
    produce_upstream,
    records_of,
    save,
    until_spans,
)
from .spans import Span, SpanSink

pytestmark = pytest.mark.stack

NODE_SERVICE = "node-purchase-worker"
JAVA_SERVICE = "java-session-worker"
NODE_STEP = "purchase.created"
JAVA_STEP = "session.created"
FAIL_DB_WRITE = "fail-db-write"
ATTRIBUTE_CARRIER = "app.payment_id"
#: The Java agent's experimental option that copies baggage entries onto span attributes.
JAVA_COPY_BAGGAGE = "OTEL_JAVA_EXPERIMENTAL_SPAN_ATTRIBUTES_COPY_FROM_BAGGAGE_INCLUDE"
#: The JVM's exit status after SIGTERM, once its shutdown hooks (the consumer's close, the
#: agent's span flush) have run.
JVM_SIGTERM_EXIT = 128 + 15


# --------------------------------------------------------------------------------- Node.js


def purchase_confirmed(payment_id: str) -> dict[str, Any]:
    return {
        "payment_id": payment_id,
        "student": "student-7",
        "course": "course-3",
        "amount": "49.00",
    }


def node_env(
    bootstrap: str, db_url: str, topics: tuple[str, str], suffix: str, sink: SpanSink, **kw: Any
) -> ServiceEnv:
    return ServiceEnv(
        bootstrap=bootstrap,
        database_url=db_url,
        consume_topic=topics[0],
        emit_topic=topics[1],
        group=f"interop-node-{suffix}",
        service_name=NODE_SERVICE,
        otlp_endpoint=sink.endpoint,
        otlp_protocol=sink.protocol,
        **kw,
    )


@pytest.mark.parametrize("carrier", ["baggage", "attribute", "key"])
async def test_node_worker_processes_a_purchase(
    carrier: str,
    kafka_bootstrap: str,
    schema: str,
    topics: tuple[str, str],
    suffix: str,
    sink: SpanSink,
) -> None:
    consume, emit = topics
    env = node_env(kafka_bootstrap, schema, topics, suffix, sink, carrier=carrier)
    run = Run(f"node-{carrier}", {"carrier": carrier, "group": env.group})
    payment_id = str(uuid.uuid4())
    with start("node", env) as service:
        try:
            up = await produce_upstream(
                kafka_bootstrap,
                consume,
                "PURCHASE_CONFIRMED",
                purchase_confirmed(payment_id),
                payment_id,
            )
            run.context["upstream"] = up.summary()
            rows = await wait_for(
                lambda: fetch(
                    schema,
                    "SELECT * FROM student_course_purchases WHERE payment_id = $1",
                    payment_id,
                ),
                what="the purchase row",
            )
            out = await records_of(kafka_bootstrap, emit, timeout_s=20.0)
            assert len(out) == 1, f"expected one emitted record, got {out}"

            async def offset_committed() -> bool:
                return await committed(kafka_bootstrap, env.group, up) == up.offset + 1

            await wait_for(offset_committed, what="the committed offset")
            await until_spans(
                sink,
                lambda spans: {f"process {consume}", f"send {emit}"} <= {s.name for s in spans},
                "the process and send spans",
            )
            assert service.stop() == 0
        finally:
            save(sink, service, run)

    # the effect and the processed mark, in the worker's own table
    purchase = rows[0]
    assert purchase["correlation_id"] == payment_id
    assert (purchase["student"], purchase["course"]) == ("student-7", "course-3")
    marks = await fetch(schema, "SELECT * FROM node_processed")
    assert [(m["msg_id"], m["kind"], m["payment_ref"], m["handler"]) for m in marks] == [
        (up.envelope.event_id, "PURCHASE_CONFIRMED", payment_id, NODE_STEP)
    ]

    # the emitted record: keyed by the payment id; header and baggage as the carrier says
    record = out[0]
    emitted = Envelope.parse(record.value)
    assert record.key == payment_id.encode()
    assert (emitted.type, emitted.version, emitted.correlation_id) == (
        "PURCHASE_CREATED",
        1,
        payment_id,
    )
    assert emitted.event_id == next_event_id(up.envelope.event_id, NODE_STEP)
    assert emitted.payload == {
        "payment_id": payment_id,
        "purchase_id": purchase["id"],
        "student": "student-7",
        "course": "course-3",
    }
    headers = {k: v.decode() for k, v in record.headers}
    assert "traceparent" in headers
    if carrier == "key":
        assert conv.CORRELATION_HEADER not in headers
    else:
        assert headers[conv.CORRELATION_HEADER] == payment_id
    if carrier == "baggage":
        assert headers["baggage"] == f"{conv.BAGGAGE_KEY}={payment_id}"
    else:
        assert "baggage" not in headers

    spans = sink.spans()
    assert {s.service for s in spans} == {NODE_SERVICE}
    process = one([s for s in spans if s.kind == "CONSUMER"], "CONSUMER span")
    assert process.name == f"process {consume}"
    # a child of the upstream producer span: the same trace
    assert (process.trace_id, process.parent_span_id) == (up.trace_id, up.span_id)
    assert process.status == "UNSET"
    attrs = process.attributes
    assert attrs[conv.MSG_SYSTEM] == "kafka"
    assert attrs[conv.MSG_DESTINATION] == consume
    assert attrs[conv.MSG_OPERATION_TYPE] == "process"
    assert attrs[conv.MSG_OPERATION_NAME] == "process"
    assert attrs[conv.MSG_PARTITION] == str(up.partition)
    assert attrs[conv.MSG_OFFSET] == str(up.offset)  # a string, not an int
    assert attrs[conv.MSG_MESSAGE_KEY] == payment_id
    # kafkajs's instrumentation names no consumer group, in any spelling
    assert [k for k in attrs if "group" in k] == []

    children = sink.children(process)
    insert = one(
        [
            s
            for s in children
            if "student_course_purchases" in str(s.attributes.get("db.query.text"))
        ],
        "purchase INSERT span",
    )
    assert insert.kind == "CLIENT"
    assert insert.attributes["db.system.name"] == "postgresql"
    assert insert.attributes["db.namespace"] == schema.rsplit("/", 1)[1]
    assert [k for k in insert.attributes if k in conv.DB_TABLE_KEYS] == []
    send = one([s for s in spans if s.kind == "PRODUCER"], "PRODUCER span")
    assert (send.name, send.parent_span_id) == (f"send {emit}", process.span_id)
    assert send.attributes[conv.MSG_DESTINATION] == emit
    assert send.attributes[conv.MSG_OPERATION_TYPE] == "send"
    assert send.attributes[conv.MSG_MESSAGE_KEY] == payment_id

    carried = {s.name for s in spans if s.attributes.get(conv.BAGGAGE_KEY) == payment_id}
    tagged = {s.name for s in spans if s.attributes.get(ATTRIBUTE_CARRIER) == payment_id}
    if carrier == "baggage":
        # the process span has it from the upstream baggage header, the rest from the handler's
        assert {process.name, insert.name, send.name} <= carried
        assert tagged == set()
    elif carrier == "attribute":
        assert (carried, tagged) == (set(), {process.name})
    else:
        assert (carried, tagged) == (set(), set())


async def test_node_worker_fail_db_write(
    kafka_bootstrap: str, schema: str, topics: tuple[str, str], suffix: str, sink: SpanSink
) -> None:
    consume, emit = topics
    env = node_env(kafka_bootstrap, schema, topics, suffix, sink, fault=FAIL_DB_WRITE)
    run = Run(
        "node-fail-db-write", {"carrier": "baggage", "fault": FAIL_DB_WRITE, "group": env.group}
    )
    payment_id = str(uuid.uuid4())
    with start("node", env) as service:
        try:
            up = await produce_upstream(
                kafka_bootstrap,
                consume,
                "PURCHASE_CONFIRMED",
                purchase_confirmed(payment_id),
                payment_id,
            )
            run.context["upstream"] = up.summary()
            # redelivered and failed again: kafkajs retries the record
            await until_spans(
                sink,
                lambda spans: len(failed_attempts(spans, f"process {consume}", up)) >= 2,
                "two failed process spans of the record",
            )
            assert service.alive()
            assert await committed(kafka_bootstrap, env.group, up) == -1
            assert await records_of(kafka_bootstrap, emit, timeout_s=1.0) == []
            assert service.stop() == 0
        finally:
            save(sink, service, run)

    assert await fetch(schema, "SELECT 1 FROM student_course_purchases") == []
    assert await fetch(schema, "SELECT 1 FROM node_processed") == []
    spans = sink.spans()
    attempts = failed_attempts(spans, f"process {consume}", up)
    for process in attempts:
        assert process.kind == "CONSUMER"
        assert (process.trace_id, process.parent_span_id) == (up.trace_id, up.span_id)
        assert "no_such_column" in process.status_message
        assert process.attributes["error.type"] == "DatabaseError"
        assert process.events == []  # the kafkajs instrumentation records no exception event
        failed = [s for s in sink.children(process) if s.status == "ERROR"]
        insert = one(failed, "failed child span")
        assert "student_course_purchases" in insert.attributes["db.query.text"]
        assert "no_such_column" in insert.status_message
        # pg's exception event is sanitized: a message with the SQLSTATE, no type, no text
        event = one_event(insert)
        assert event["attributes"] == {
            conv.EXCEPTION_MESSAGE: "PostgreSQL error of type 'error' occurred (code: 42703)"
        }
    assert [s for s in spans if s.kind == "PRODUCER"] == []


# --------------------------------------------------------------------------------- Java


def trainer_allocated(payment_id: str) -> dict[str, Any]:
    return {
        "payment_id": payment_id,
        "student": "student-7",
        "course": "course-3",
        "trainer": "trainer-2",
    }


def java_env(
    bootstrap: str, db_url: str, topics: tuple[str, str], suffix: str, sink: SpanSink, **kw: Any
) -> ServiceEnv:
    return ServiceEnv(
        bootstrap=bootstrap,
        database_url=db_url,
        consume_topic=topics[0],
        group=f"interop-java-{suffix}",
        service_name=JAVA_SERVICE,
        otlp_endpoint=sink.endpoint,
        otlp_protocol=sink.protocol,
        **kw,
    )


#: OTEL_SEMCONV_STABILITY_OPT_IN for the Java agent: its default (the older semantic
#: conventions) and the stable database + messaging ones.
JAVA_SEMCONV = {"default": None, "stable": "database,messaging"}


@pytest.mark.parametrize("semconv", list(JAVA_SEMCONV))
async def test_java_consumer_processes_an_allocation(
    semconv: str,
    kafka_bootstrap: str,
    schema: str,
    topics: tuple[str, str],
    suffix: str,
    sink: SpanSink,
) -> None:
    consume, _ = topics
    options = {JAVA_COPY_BAGGAGE: conv.BAGGAGE_KEY}
    if JAVA_SEMCONV[semconv]:
        options["OTEL_SEMCONV_STABILITY_OPT_IN"] = JAVA_SEMCONV[semconv]
    env = java_env(kafka_bootstrap, schema, topics, suffix, sink, extra=options)
    run = Run(f"java-{semconv}", {"group": env.group, "agent_options": options})
    payment_id = str(uuid.uuid4())
    with start("java", env) as service:
        try:
            up = await produce_upstream(
                kafka_bootstrap,
                consume,
                "TRAINER_ALLOCATED",
                trainer_allocated(payment_id),
                payment_id,
            )
            run.context["upstream"] = up.summary()
            rows = await wait_for(
                lambda: fetch(
                    schema, "SELECT * FROM tutoring_sessions WHERE correlation_id = $1", payment_id
                ),
                what="the session row",
            )

            async def offset_committed() -> bool:
                return await committed(kafka_bootstrap, env.group, up) == up.offset + 1

            await wait_for(offset_committed, what="the committed offset")
            await until_spans(
                sink,
                lambda spans: any(s.kind == "CONSUMER" for s in spans),
                "the process span",
            )
            assert service.stop() == JVM_SIGTERM_EXIT
            assert "java-consumer: stopped" in service.log()
        finally:
            save(sink, service, run)

    assert (rows[0]["student"], rows[0]["trainer"]) == ("student-7", "trainer-2")
    marks = await fetch(schema, "SELECT * FROM java_handled")
    assert [(m["event_ref"], m["event_kind"], m["payment"], m["worker"]) for m in marks] == [
        (up.envelope.event_id, "TRAINER_ALLOCATED", payment_id, JAVA_STEP)
    ]
    spans = sink.spans()
    assert {s.service for s in spans} == {JAVA_SERVICE}
    process = one([s for s in spans if s.kind == "CONSUMER"], "CONSUMER span")
    # by default too a child of the upstream producer span, the same trace (no receive span)
    assert (process.trace_id, process.parent_span_id) == (up.trace_id, up.span_id)
    assert process.status == "UNSET"
    attrs = process.attributes
    assert attrs[conv.MSG_SYSTEM] == "kafka"
    assert attrs[conv.MSG_DESTINATION] == consume
    assert attrs[conv.MSG_PARTITION] == str(up.partition)
    assert attrs[conv.MSG_MESSAGE_KEY] == payment_id
    assert attrs["messaging.message.body.size" if semconv == "default" else conv.MSG_OPERATION_NAME]
    # the payment id from the upstream baggage header, copied by the agent's experimental option
    assert attrs[conv.BAGGAGE_KEY] == payment_id
    if semconv == "default":
        assert process.name == f"{consume} process"
        assert attrs["messaging.operation"] == "process"
        assert attrs["messaging.kafka.consumer.group"] == env.group
        assert attrs["messaging.kafka.message.offset"] == up.offset  # an int
        assert attrs["messaging.client_id"] == JAVA_SERVICE
        assert not {conv.MSG_GROUP, conv.MSG_OPERATION_TYPE, conv.MSG_OFFSET} & set(attrs)
        assert process.links == []
    else:
        assert process.name == f"process {consume}"
        assert attrs[conv.MSG_OPERATION_TYPE] == "process"
        assert attrs[conv.MSG_GROUP] == env.group
        assert attrs[conv.MSG_OFFSET] == up.offset  # an int
        assert attrs[conv.MSG_CLIENT_ID] == JAVA_SERVICE
        assert not {"messaging.operation", "messaging.kafka.consumer.group"} & set(attrs)
        # the stable conventions add a link to the producer span as well
        assert [(link["trace_id"], link["span_id"]) for link in process.links] == [
            (up.trace_id, up.span_id)
        ]

    children = sink.children(process)
    assert all(
        c.kind == "CLIENT" and c.attributes[conv.BAGGAGE_KEY] == payment_id for c in children
    )
    database = schema.rsplit("/", 1)[1]
    if semconv == "default":
        assert [c.name for c in children] == [
            f"SELECT {database}.java_handled",
            f"INSERT {database}.tutoring_sessions",
            f"INSERT {database}.java_handled",
        ]
        insert = children[1]
        assert insert.attributes["db.sql.table"] == "tutoring_sessions"
        assert insert.attributes["db.operation"] == "INSERT"
        assert insert.attributes["db.name"] == database
        assert insert.attributes["db.system"] == "postgresql"
        assert insert.attributes["db.statement"].startswith("INSERT INTO tutoring_sessions (")
    else:
        assert [c.name for c in children] == [
            "SELECT java_handled",
            "INSERT tutoring_sessions",
            "INSERT java_handled",
        ]
        insert = children[1]
        assert insert.attributes["db.query.summary"] == "INSERT tutoring_sessions"
        assert insert.attributes["db.query.text"].startswith("INSERT INTO tutoring_sessions (")
        assert insert.attributes["db.system.name"] == "postgresql"
        # the stable namespace is "<database>|hoptrace" here (the role; the schema is public)
        assert insert.attributes["db.namespace"].split("|")[0] == database
        assert not set(conv.DB_TABLE_KEYS) & set(insert.attributes)
    # the statement is sanitized: no payment id, names or times in it
    statements = [
        str(c.attributes.get("db.statement", c.attributes.get("db.query.text"))) for c in children
    ]
    assert all(payment_id not in text and "?" in text for text in statements)


async def test_java_consumer_fail_db_write(
    kafka_bootstrap: str, schema: str, topics: tuple[str, str], suffix: str, sink: SpanSink
) -> None:
    consume, _ = topics
    env = java_env(kafka_bootstrap, schema, topics, suffix, sink, fault=FAIL_DB_WRITE)
    run = Run(
        "java-fail-db-write", {"fault": FAIL_DB_WRITE, "group": env.group, "agent_options": {}}
    )
    payment_id = str(uuid.uuid4())

    def attempts(spans: list[Span]) -> list[Span]:
        return [
            s
            for s in spans
            if s.kind == "CONSUMER"
            and s.attributes.get("messaging.kafka.message.offset") == up.offset
            and s.attributes.get(conv.MSG_PARTITION) == str(up.partition)
        ]

    with start("java", env) as service:
        try:
            up = await produce_upstream(
                kafka_bootstrap,
                consume,
                "TRAINER_ALLOCATED",
                trainer_allocated(payment_id),
                payment_id,
            )
            run.context["upstream"] = up.summary()
            # sought back and failed again: the consumer retries the record
            await until_spans(
                sink, lambda spans: len(attempts(spans)) >= 2, "two process spans of the record"
            )
            assert service.alive()
            assert await committed(kafka_bootstrap, env.group, up) == -1
            assert service.stop() == JVM_SIGTERM_EXIT
            assert "java-consumer: stopped" in service.log()
        finally:
            save(sink, service, run)

    assert await fetch(schema, "SELECT 1 FROM tutoring_sessions") == []
    assert await fetch(schema, "SELECT 1 FROM java_handled") == []
    spans = sink.spans()
    for process in attempts(spans):
        assert process.name == f"{consume} process"
        assert (process.trace_id, process.parent_span_id) == (up.trace_id, up.span_id)
        # the agent leaves the process span alone: no error status, no event
        assert (process.status, process.events) == ("UNSET", [])
        failed = [s for s in sink.children(process) if s.status == "ERROR"]
        insert = one(failed, "failed child span")
        assert insert.name.endswith(".tutoring_sessions") and insert.name.startswith("INSERT ")
        assert insert.status_message == ""
        event = one_event(insert)
        assert event["attributes"][conv.EXCEPTION_TYPE] == "org.postgresql.util.PSQLException"
        assert "no_such_column" in event["attributes"][conv.EXCEPTION_MESSAGE]
    # without the copy-from-baggage option no span carries the upstream baggage
    assert [s.name for s in spans if conv.BAGGAGE_KEY in s.attributes] == []


# --------------------------------------------------------------------------------- harness


def test_harness_reports_a_service_that_exits_before_ready(
    kafka_bootstrap: str, db_url: str, suffix: str, sink: SpanSink
) -> None:
    env = node_env(kafka_bootstrap, db_url, ("in", "out"), suffix, sink, carrier="bogus")
    with pytest.raises(ServiceError) as failure:
        start("node", env)
    message = str(failure.value)
    assert "exited with 1 before READY" in message
    assert "CARRIER=bogus: expected one of baggage, attribute, key" in message  # its log
