"""The pure diagnosis: one table row per cause code, plus the edge cases. No servers."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from hoptrace.collector.diagnosis import (
    CAUSES,
    DlqRecord,
    Evidence,
    KafkaFacts,
    ProcessedEvent,
    RecordRef,
    SpanRecord,
    diagnose,
)
from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT

SPEC = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
STEPS = [s.id for s in SPEC.steps]
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
CID = "pay-123"
OFFSETS = {"purchase-confirmed": 10, "purchase-created": 20, "trainer-allocated": 30}


def span(
    step_id: str,
    outcome: str = "ok",
    at: float | None = None,
    trace: str = "a" * 32,
    emit: bool = True,
    error: str | None = None,
    group: str | None = None,
    sid: str | None = None,
) -> SpanRecord:
    step = SPEC.step(step_id)
    i = SPEC.index(step_id)
    start = T0 + timedelta(seconds=i if at is None else at)
    attrs: dict = {
        "hoptrace.pipeline": SPEC.name,
        "hoptrace.step": step_id,
        "hoptrace.step.outcome": outcome,
        "hoptrace.correlation_id": CID,
    }
    if step.consumes:
        attrs |= {
            "messaging.destination.name": step.consumes,
            "messaging.destination.partition.id": "1",
            "messaging.kafka.offset": OFFSETS[step.consumes],
            "messaging.consumer.group.name": group or step.group,
        }
    if emit and step.emits and outcome != "error":
        attrs |= {
            "hoptrace.emit.topic": step.emits,
            "hoptrace.emit.partition": 1,
            "hoptrace.emit.offset": OFFSETS[step.emits],
        }
    return SpanRecord(
        trace_id=trace,
        span_id=sid or f"{step_id}-{outcome}-{at}",
        name=step_id,
        service=step.service,
        start_time=start,
        end_time=start + timedelta(milliseconds=100),
        status_code=2 if outcome == "error" else 1,
        status_message=error,
        step=step_id,
        outcome=outcome,
        attributes=attrs,
    )


def healthy_kafka(**overrides: dict) -> dict[str, KafkaFacts]:
    """Every consumed topic exists, every group has a member and committed past the record."""
    out = {}
    for step in SPEC.steps:
        if not step.consumes:
            continue
        off = OFFSETS[step.consumes]
        kf = KafkaFacts(
            topic=step.consumes,
            group=step.group,
            topic_exists=True,
            group_exists=True,
            group_state="Stable",
            group_members=1,
            record=RecordRef(step.consumes, 1, off),
            committed_offset=off + 1,
            end_offset=off + 1,
            other_groups=(),
        )
        out[step.id] = replace(kf, **overrides.get(step.id, {}))
    return out


def waiting(step_id: str, **kw: object) -> dict:
    """Kafka facts of a step whose record has not been consumed yet."""
    off = OFFSETS[SPEC.step(step_id).consumes]
    return {step_id: {"committed_offset": off, "end_offset": off + 1, **kw}}


def processed(*step_ids: str) -> tuple[ProcessedEvent, ...]:
    out = []
    for sid in step_ids:
        step = SPEC.step(sid)
        etype = step.consumes.replace("-", "_").upper()
        out.append(ProcessedEvent(f"evt-{sid}", etype, step.service, T0))
    return tuple(out)


def evidence(spans=(), kafka=None, effects=None, marks=None, missing=None) -> Evidence:
    done = {s.step for s in spans if s.outcome in ("ok", "duplicate")}
    return Evidence(
        correlation_id=CID,
        spans=tuple(spans),
        kafka=healthy_kafka() if kafka is None else kafka,
        processed=processed(*[s for s in STEPS[1:] if s in done]) if marks is None else marks,
        effects={s: s in done for s in STEPS} if effects is None else effects,
        missing=missing or {},
    )


def done_through(n: int, trace: str = "a" * 32) -> list[SpanRecord]:
    return [span(s, trace=trace) for s in STEPS[:n]]


SOON = T0 + timedelta(seconds=5)  # within every deadline after the last step
LATE = T0 + timedelta(minutes=10)  # past every deadline


def statuses(d) -> list[str]:
    return [s.status for s in d.steps]


# --------------------------------------------------------------------------- one row per cause
CASES = [
    # id, evidence, now, stopped_at, cause, action fragment
    ("completed", evidence(done_through(4)), LATE, None, "completed", "nothing"),
    (
        "in_progress",
        evidence(done_through(2), kafka=healthy_kafka(**waiting("trainer.allocated"))),
        SOON,
        "trainer.allocated",
        "in_progress",
        "wait",
    ),
    (
        "topic_missing",
        evidence(
            done_through(1),
            kafka=healthy_kafka(
                **{"purchase.created": {"topic_exists": False, "group_exists": False}}
            ),
        ),
        SOON,
        "purchase.created",
        "topic_missing",
        "create topic purchase-confirmed",
    ),
    (
        "topic_missing_on_emit",
        evidence(
            done_through(1)
            + [span("purchase.created", "error", error="UnknownTopicOrPartitionError")],
            kafka=healthy_kafka(**{"trainer.allocated": {"topic_exists": False}}),
        ),
        SOON,
        "purchase.created",
        "topic_missing",
        "create topic purchase-created",
    ),
    (
        "no_consumer",
        evidence(
            done_through(2),
            kafka=healthy_kafka(
                **waiting("trainer.allocated", group_members=0, group_state="Empty")
            ),
        ),
        SOON,
        "trainer.allocated",
        "no_consumer",
        "start allocation-worker",
    ),
    (
        "no_consumer_wrong_group",
        evidence(
            done_through(2),
            kafka=healthy_kafka(
                **waiting(
                    "trainer.allocated",
                    group_exists=False,
                    group_members=0,
                    committed_offset=None,
                    other_groups=("allocation-worker-wrong",),
                )
            ),
        ),
        SOON,
        "trainer.allocated",
        "no_consumer",
        "allocation-worker-wrong",
    ),
    (
        "consumer_lag",
        evidence(
            done_through(2), kafka=healthy_kafka(**waiting("trainer.allocated", end_offset=500))
        ),
        LATE,
        "trainer.allocated",
        "consumer_lag",
        "allocation-worker",
    ),
    (
        "processing_error",
        evidence(
            done_through(2) + [span("trainer.allocated", "error", error="KeyError: 'course'")]
        ),
        SOON,
        "trainer.allocated",
        "processing_error",
        "fix allocation-worker",
    ),
    (
        "downstream_error",
        evidence(
            done_through(2)
            + [
                replace(
                    span("trainer.allocated", "error", error="admin-service returned 500"),
                    attributes={
                        "hoptrace.step": "trainer.allocated",
                        "hoptrace.error.kind": "downstream",
                    },
                )
            ]
        ),
        SOON,
        "trainer.allocated",
        "downstream_error",
        "admin-service",
    ),
    (
        "processing_error_dlq_only",
        evidence(
            done_through(2),
            kafka=healthy_kafka(
                **{
                    "trainer.allocated": {
                        "dlq": DlqRecord("purchase-created.dlq", 0, 3, "ValueError: bad payload"),
                        "dlq_checked": True,
                    }
                }
            ),
            effects={"payment.confirmed": True, "purchase.created": True},
        ),
        SOON,
        "trainer.allocated",
        "processing_error",
        "purchase-created.dlq",
    ),
    (
        "marked_without_effect",
        evidence(
            done_through(3),
            effects={
                "payment.confirmed": True,
                "purchase.created": True,
                "trainer.allocated": False,
            },
        ),
        SOON,
        "trainer.allocated",
        "marked_without_effect",
        "verify the effect",
    ),
    (
        "not_emitted",
        evidence(
            [span("payment.confirmed", emit=False)],
            kafka=healthy_kafka(**{"purchase.created": {"record": None, "committed_offset": 10}}),
        ),
        SOON,
        "purchase.created",
        "not_emitted",
        "re-emit purchase-confirmed",
    ),
    (
        "consumed_without_trace",
        evidence(
            done_through(2),
            effects={
                "payment.confirmed": True,
                "purchase.created": True,
                "trainer.allocated": True,
            },
            marks=processed("purchase.created", "trainer.allocated"),
        ),
        LATE,
        "trainer.allocated",
        "consumed_without_trace",
        "instrument allocation-worker",
    ),
    (
        "missing_evidence_kafka",
        evidence(done_through(2), kafka={}, missing={"kafka": "timed out after 2.0s"}),
        LATE,
        "trainer.allocated",
        "missing_evidence",
        "retry",
    ),
]


@pytest.mark.parametrize(
    ("ev", "now", "stopped_at", "cause", "action"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_cause_table(
    ev: Evidence, now: datetime, stopped_at: str | None, cause: str, action: str
) -> None:
    d = diagnose(SPEC, ev, now)
    assert d.found
    assert (d.stopped_at, d.cause) == (stopped_at, cause), d.evidence
    assert action in d.next_action
    assert d.evidence, "a cause always comes with the evidence that decided it"
    if stopped_at:
        i = STEPS.index(stopped_at)
        assert all(s.status == "done" for s in d.steps[:i])
        assert d.steps[i].status != "done"


def test_every_cause_code_is_in_the_table() -> None:
    covered = {c[4] for c in CASES}
    assert covered == set(CAUSES)


def test_statuses_and_state() -> None:
    d = diagnose(
        SPEC, evidence(done_through(2) + [span("trainer.allocated", "error", error="boom")]), SOON
    )
    assert statuses(d) == ["done", "done", "failed", "not_reached"]
    assert d.state == "failed"
    lag = evidence(done_through(2), kafka=healthy_kafka(**waiting("trainer.allocated")))
    assert statuses(diagnose(SPEC, lag, SOON)) == ["done", "done", "pending", "not_reached"]
    assert diagnose(SPEC, lag, SOON).state == "in_progress"
    assert statuses(diagnose(SPEC, lag, LATE)) == ["done", "done", "stalled", "not_reached"]
    assert diagnose(SPEC, lag, LATE).state == "stalled"
    assert diagnose(SPEC, evidence(done_through(4)), LATE).state == "completed"


def test_downstream_error_from_failed_http_child_span() -> None:
    parent = span("trainer.allocated", "error", error="allocation failed")
    child = SpanRecord(
        trace_id=parent.trace_id,
        span_id="http-1",
        parent_span_id=parent.span_id,
        name="POST",
        service="allocation-worker",
        kind="client",
        start_time=parent.start_time,
        end_time=parent.end_time,
        status_code=2,
        attributes={"http.response.status_code": 500, "server.address": "admin-service"},
    )
    d = diagnose(SPEC, evidence(done_through(2) + [parent, child]), SOON)
    assert (d.stopped_at, d.cause) == ("trainer.allocated", "downstream_error")
    assert any("HTTP 500" in line for line in d.evidence)
    assert d.steps[2].status == "failed"


def test_downstream_error_from_error_kind_attribute() -> None:
    err = span(
        "trainer.allocated", "error", error="no trainer_allocations row after admin-service call"
    )
    err = replace(err, attributes={**err.attributes, "hoptrace.error.kind": "downstream"})
    d = diagnose(SPEC, evidence(done_through(2) + [err]), SOON)
    assert d.cause == "downstream_error"


def test_unknown_correlation_is_not_found() -> None:
    d = diagnose(
        SPEC, Evidence(correlation_id="nope", kafka=healthy_kafka(), processed=(), effects={}), SOON
    )
    assert not d.found
    assert "no span" in d.evidence[0]


def test_spans_unreadable_is_missing_evidence_not_a_guess() -> None:
    ev = Evidence(correlation_id=CID, missing={"spans": "timed out after 2.0s"})
    d = diagnose(SPEC, ev, SOON)
    assert d.cause == "missing_evidence"
    assert "timed out" in d.evidence[0]


def test_kafka_unreadable_within_deadline_is_in_progress_with_the_gap_named() -> None:
    d = diagnose(SPEC, evidence(done_through(2), kafka={}, missing={"kafka": "timed out"}), SOON)
    assert d.cause == "in_progress"
    assert any("Kafka could not be read" in line for line in d.evidence)


# --------------------------------------------------------------------------- edge cases
def test_redelivery_after_a_crash_is_done_across_two_traces() -> None:
    crash = span("purchase.created", "error", at=1, trace="b" * 32, error="worker crashed")
    redelivered = span("purchase.created", "duplicate", at=3, trace="c" * 32)
    spans = [span("payment.confirmed", trace="b" * 32), crash, redelivered]
    spans += [span(s, at=4 + i, trace="c" * 32) for i, s in enumerate(STEPS[2:])]
    d = diagnose(SPEC, evidence(spans), LATE)
    assert d.cause == "completed"
    assert d.step("purchase.created").outcomes == ("error", "duplicate")
    assert set(d.step("purchase.created").trace_ids) == {"b" * 32, "c" * 32}
    assert set(d.trace_ids) == {"b" * 32, "c" * 32}


def test_redelivery_after_a_crash_that_lost_the_emit_is_not_emitted() -> None:
    spans = [span("payment.confirmed"), span("purchase.created", "duplicate", emit=False)]
    kafka = healthy_kafka(**{"trainer.allocated": {"record": None}})
    d = diagnose(SPEC, evidence(spans, kafka=kafka), SOON)
    assert (d.stopped_at, d.cause) == ("trainer.allocated", "not_emitted")
    assert any("only ran as a duplicate" in line for line in d.evidence)


def test_two_traces_for_one_payment() -> None:
    spans = done_through(2, trace="1" * 32) + [span(s, trace="2" * 32) for s in STEPS[2:]]
    d = diagnose(SPEC, evidence(spans), LATE)
    assert d.cause == "completed"
    assert d.trace_ids == ("1" * 32, "2" * 32)
    assert d.step("session.created").trace_ids == ("2" * 32,)


def test_spans_arriving_late_wait_then_turn_into_consumed_without_trace() -> None:
    spans = [span(s) for s in STEPS if s != "purchase.created"]
    ev = evidence(spans, effects={s: True for s in STEPS}, marks=processed(*STEPS[1:]))
    early = diagnose(SPEC, ev, T0 + timedelta(seconds=4))
    assert (early.stopped_at, early.cause) == ("purchase.created", "in_progress")
    assert early.step("trainer.allocated").status == "done"
    assert diagnose(SPEC, ev, LATE).cause == "consumed_without_trace"
    # once the late span is in, the correlation is complete
    assert (
        diagnose(SPEC, replace(ev, spans=ev.spans + (span("purchase.created"),)), LATE).cause
        == "completed"
    )


def test_span_order_does_not_matter() -> None:
    spans = done_through(4) + [span("trainer.allocated", "duplicate", at=9)]
    shuffled = spans[:]
    random.Random(7).shuffle(shuffled)
    a = diagnose(SPEC, evidence(spans), LATE)
    b = diagnose(SPEC, evidence(shuffled), LATE)
    assert a == b


def test_step_done_twice_is_done_and_says_so() -> None:
    spans = done_through(4) + [span("trainer.allocated", at=7, sid="second")]
    d = diagnose(SPEC, evidence(spans), LATE)
    assert d.cause == "completed"
    assert d.step("trainer.allocated").runs == 2
    assert any("trainer.allocated ran 2 times" in line for line in d.evidence)


def test_error_then_successful_retry_is_done() -> None:
    spans = done_through(2) + [
        span("trainer.allocated", "error", at=2, error="timeout"),
        span("trainer.allocated", "ok", at=5),
        span("session.created", at=6),
    ]
    d = diagnose(SPEC, evidence(spans), LATE)
    assert d.cause == "completed"
    assert d.step("trainer.allocated").status == "done"


def test_consumed_as_another_group_is_named_in_the_step_evidence() -> None:
    spans = (
        done_through(2) + [span("trainer.allocated", group="intruder")] + [span("session.created")]
    )
    d = diagnose(SPEC, evidence(spans), LATE)
    assert any(
        "as group intruder (spec expects allocation-worker)" in line
        for line in d.step("trainer.allocated").evidence
    )


def test_effect_unknown_does_not_claim_marked_without_effect() -> None:
    ev = evidence(done_through(4), effects={}, missing={"database": "timed out"})
    d = diagnose(SPEC, ev, LATE)
    assert d.cause == "completed"
    assert d.missing == {"database": "timed out"}


def test_first_step_whose_emit_topic_is_missing_is_topic_missing() -> None:
    """payment-service cannot emit: no span yet (the send is still waiting), the payment row is
    there, and the topic it emits to does not exist."""
    kafka = healthy_kafka(**{"purchase.created": {"topic_exists": False, "record": None}})
    ev = evidence([], kafka=kafka, effects={"payment.confirmed": True}, marks=())
    d = diagnose(SPEC, ev, SOON)
    assert (d.stopped_at, d.cause) == ("payment.confirmed", "topic_missing")
    assert d.next_action.startswith("create topic purchase-confirmed")


def test_wrong_group_is_a_warning_when_the_payment_went_through() -> None:
    spans = done_through(2) + [span("trainer.allocated", group="allocation-worker-v2")]
    spans.append(span("session.created"))
    d = diagnose(SPEC, evidence(spans), LATE)
    assert d.cause == "completed"
    assert any("allocation-worker-v2" in w for w in d.warnings)
