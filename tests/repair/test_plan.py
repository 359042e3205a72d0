"""The safe action per cause (``hoptrace.repair.plan``), one test per cause, from a diagnosis and
what the sources found: pure, no servers."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hoptrace.contract import Cause, load_spec
from hoptrace.repair.plan import BRANCH_PREFIX, Found, Kind, Mark, StoredRecord, decide, plan
from tests.support import REFERENCE_SPEC

SPEC = load_spec(REFERENCE_SPEC)
CID = "pay-1"
DLQ = StoredRecord("purchase-created.dlq[0]@3", b"{}", b"pay-1", (), "ev-1")
INPUT = StoredRecord("purchase-created[0]@7", b"{}", b"pay-1", (), "ev-1")
STORED = StoredRecord("processed_events.emitted of purchase.created", b"{}", b"pay-1", (), "ev-1")
MARK = Mark("processed_events", "ev-1", "correlation_id = $1", (CID,))


@dataclass
class Step:
    id: str
    evidence: tuple[str, ...] = ()


@dataclass
class Diag:
    cause: str
    stopped_at: str | None
    stopped_at_all: tuple[str, ...] = ()
    correlation_id: str = CID
    trace_ids: tuple[str, ...] = ("a" * 32,)
    missing: dict[str, str] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()

    def step(self, sid: str) -> Step:
        return next((s for s in self.steps if s.id == sid), Step(sid))


def one(cause: Cause, sid: str = "trainer.allocated", **found: object):
    d = Diag(cause.value, sid, (sid,))
    (act,) = plan(SPEC, d, {sid: Found(sid, **found)})  # type: ignore[arg-type]
    return act


def test_completed_has_nothing_to_do() -> None:
    (act,) = plan(SPEC, Diag(Cause.COMPLETED.value, None), {})
    assert act.kind == Kind.NOTHING and "completed" in act.reason


def test_missing_evidence_refuses() -> None:
    d = Diag(Cause.MISSING_EVIDENCE.value, "trainer.allocated", missing={"kafka": "timed out"})
    (act,) = plan(SPEC, d, {"trainer.allocated": Found("trainer.allocated")})
    assert act.kind == Kind.REFUSE and "kafka: timed out" in act.reason


def test_any_unreadable_source_refuses_whatever_the_cause() -> None:
    d = Diag(Cause.IN_PROGRESS.value, "trainer.allocated", missing={"kafka": "timed out"})
    found = Found("trainer.allocated", input_ref="t[0]@1", stored=STORED)
    (act,) = plan(SPEC, d, {"trainer.allocated": found})
    assert act.kind == Kind.REFUSE and "does not act on a guess" in act.reason


@pytest.mark.parametrize(
    "cause", [Cause.NO_CONSUMER, Cause.CONSUMER_LAG, Cause.IN_PROGRESS, Cause.TOPIC_MISSING]
)
def test_record_still_in_its_topic_waits(cause: Cause) -> None:
    act = one(cause, input_ref=INPUT.where, input_record=INPUT, stored=STORED)
    assert act.kind == Kind.WAIT and not act.kind.sends
    assert "will flow once" in act.reason or "in progress" in act.reason


@pytest.mark.parametrize(
    "cause", [Cause.NO_CONSUMER, Cause.CONSUMER_LAG, Cause.IN_PROGRESS, Cause.TOPIC_MISSING]
)
def test_record_gone_from_its_topic_reemits_the_stored_event(cause: Cause) -> None:
    act = one(cause, input_ref=INPUT.where, stored=STORED)
    assert act.kind == Kind.REEMIT_STORED and act.record is STORED
    assert act.topic == SPEC.step("trainer.allocated").consumes
    assert act.remove_mark is None


def test_record_gone_and_nothing_stored_refuses_saying_why() -> None:
    act = one(Cause.NO_CONSUMER, input_ref=INPUT.where, stored_missing="ledger holds nothing")
    assert act.kind == Kind.REFUSE and act.reason == "ledger holds nothing"


def test_a_missing_topic_refuses_until_it_exists() -> None:
    act = one(Cause.TOPIC_MISSING, missing_topics=("purchase-created",), stored=STORED)
    assert act.kind == Kind.REFUSE and "hoptrace topics ensure" in act.reason


@pytest.mark.parametrize("cause", [Cause.PROCESSING_ERROR, Cause.DOWNSTREAM_ERROR])
def test_failed_step_republishes_the_dead_lettered_record(cause: Cause) -> None:
    act = one(cause, dead_letter=DLQ, input_record=INPUT)
    assert act.kind == Kind.REPUBLISH_DEAD_LETTER and act.record is DLQ
    assert act.topic == SPEC.step("trainer.allocated").consumes
    assert "send purchase-created.dlq[0]@3 to" in act.describe()


def test_failed_step_without_a_dead_lettered_record_refuses() -> None:
    act = one(Cause.DOWNSTREAM_ERROR, input_record=INPUT)
    assert act.kind == Kind.REFUSE and "dead-lettered" in act.reason


def test_marked_without_effect_removes_the_mark_and_republishes_the_input() -> None:
    act = one(Cause.MARKED_WITHOUT_EFFECT, mark=MARK, input_record=INPUT, stored=STORED)
    assert act.kind == Kind.REPUBLISH_INPUT and act.record is INPUT and act.remove_mark is MARK
    assert act.describe().startswith("remove the processed_events mark of event ev-1, then send")
    gone = one(Cause.MARKED_WITHOUT_EFFECT, mark=MARK, stored=STORED)
    assert gone.kind == Kind.REEMIT_STORED and gone.remove_mark is MARK
    assert one(Cause.MARKED_WITHOUT_EFFECT, input_record=INPUT).kind == Kind.REFUSE


def test_not_emitted_reemits_the_producer_s_stored_event_or_refuses() -> None:
    outbox = StoredRecord("payment_outbox (payment-service's outbox)", b"{}", b"pay-1")
    act = one(Cause.NOT_EMITTED, "purchase.created", stored=outbox)
    assert act.kind == Kind.REEMIT_STORED and act.record is outbox
    assert act.topic == SPEC.step("purchase.created").consumes
    why = "payment_outbox has no event for pay-1"
    refused = one(Cause.NOT_EMITTED, "purchase.created", stored_missing=why)
    assert refused.kind == Kind.REFUSE and refused.reason == why


def test_consumed_without_trace_republishes_the_input_record() -> None:
    act = one(Cause.CONSUMED_WITHOUT_TRACE, "purchase.created", input_record=INPUT, stored=STORED)
    assert act.kind == Kind.REPUBLISH_INPUT and act.record is INPUT
    gone = one(Cause.CONSUMED_WITHOUT_TRACE, "purchase.created", stored=STORED)
    assert gone.kind == Kind.REEMIT_STORED


def test_a_redrive_in_flight_sends_nothing() -> None:
    act = one(Cause.DOWNSTREAM_ERROR, dead_letter=DLQ, in_flight="redrive #3 sent x[0]@1")
    assert act.kind == Kind.IN_FLIGHT and "redrive #3" in act.reason


def test_each_stopped_branch_is_redriven_on_its_own() -> None:
    d = Diag(
        Cause.DOWNSTREAM_ERROR.value,
        "trainer.allocated",
        ("trainer.allocated", "session.created"),
        steps=(Step("session.created", (f"{BRANCH_PREFIX}no_consumer",)),),
    )
    found = {
        "trainer.allocated": Found("trainer.allocated", dead_letter=DLQ),
        "session.created": Found("session.created", input_ref="t[0]@1", stored=STORED),
    }
    first, second = plan(SPEC, d, found)
    assert (first.step, first.kind) == ("trainer.allocated", Kind.REPUBLISH_DEAD_LETTER)
    assert (second.step, second.cause, second.kind) == (
        "session.created",
        "no_consumer",
        Kind.REEMIT_STORED,
    )


def test_a_first_step_whose_producer_keeps_its_event_waits() -> None:
    outbox = StoredRecord("payment_outbox", b"{}")
    act = decide(
        SPEC, CID, "payment.confirmed", Cause.TOPIC_MISSING.value, Found("x", stored=outbox)
    )
    assert act.kind == Kind.WAIT and "payment_outbox" in act.reason
