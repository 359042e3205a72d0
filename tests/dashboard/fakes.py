"""Small fixture objects in the agreed API shapes, for rendering tests without servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hoptrace.dashboard.source import BadFilter, MalformedId, UnknownId

T0 = datetime(2026, 11, 27, 1, 0, tzinfo=UTC)
STEPS = ["payment.confirmed", "purchase.created", "trainer.allocated", "session.created"]
SERVICES = ["payment-service", "purchase-worker", "allocation-worker", "session-worker"]


@dataclass
class Step:
    id: str
    status: str
    service: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    evidence: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    correlation_id: str
    state: str
    steps: list[Step]
    stopped_at: str | None
    cause: str
    evidence: list[str]
    next_action: str | None
    trace_ids: list[str]
    jaeger_urls: list[str]
    kafka_facts: list[dict[str, Any]]
    db_facts: list[dict[str, Any]]
    stopped_at_all: list[str] = field(default_factory=list)


def fanout_diagnosis(cid: str = "pay-fanout-1") -> Diagnosis:
    """Two unfinished branches: the first step not done, and another branch's step, whose
    evidence holds its own cause and a status message with Markdown in it."""
    d = stalled_diagnosis(cid)
    d.steps[3] = Step(
        STEPS[3],
        "pending",
        SERVICES[3],
        evidence=["branch stopped here: in_progress", "error: [click](http://evil.test) **x**"],
    )
    d.stopped_at_all = [STEPS[2], STEPS[3]]
    return d


def stalled_diagnosis(cid: str = "pay-stalled-1") -> Diagnosis:
    steps = [
        Step(s, "done", svc, T0 + timedelta(seconds=i), T0 + timedelta(seconds=i, milliseconds=80))
        for i, (s, svc) in enumerate(zip(STEPS[:2], SERVICES[:2], strict=True))
    ]
    steps.append(Step(STEPS[2], "stalled", SERVICES[2]))
    steps.append(Step(STEPS[3], "not_reached", SERVICES[3]))
    return Diagnosis(
        correlation_id=cid,
        state="stalled",
        steps=steps,
        stopped_at="trainer.allocated",
        cause="no_consumer",
        evidence=["consumer group allocation-worker has no members"],
        next_action="start allocation-worker",
        trace_ids=["a" * 32],
        jaeger_urls=[f"http://jaeger.test/trace/{'a' * 32}"],
        kafka_facts=[
            {
                "topic": "purchase-created",
                "partition": 1,
                "produced_offset": 41,
                "committed_offset": 40,
                "lag": 1,
            }
        ],
        db_facts=[
            {"table": "processed_events", "rows": 0},
            {"table": "trainer_allocations", "rows": 0},
        ],
    )


def spans_for(d: Diagnosis) -> list[dict[str, Any]]:
    out = []
    for s in d.steps:
        if s.started_at:
            out.append(
                {
                    "trace_id": "a" * 32,
                    "name": s.id,
                    "service": s.service,
                    "step": s.id,
                    "start_time": s.started_at,
                    "end_time": s.ended_at,
                    "outcome": "ok",
                }
            )
    return out


class FakeSource:
    def __init__(self) -> None:
        self.diagnoses = {"pay-stalled-1": stalled_diagnosis(), "pay-fanout-1": fanout_diagnosis()}
        self.calls: list[str] = []
        self.payment_params: list[dict[str, str]] = []

    def diagnose(self, correlation_id: str) -> Any:
        if not correlation_id.startswith("pay-"):
            raise MalformedId(f"'{correlation_id}' is not a payment id")
        if correlation_id not in self.diagnoses:
            raise UnknownId(f"No payment with id '{correlation_id}' is known")
        return self.diagnoses[correlation_id]

    def spans(self, correlation_id: str) -> list[Any]:
        return spans_for(self.diagnoses[correlation_id])

    def state_counts(self, since: datetime) -> Any:
        self.calls.append("state_counts")
        return {"completed": 7, "in_progress": 2, "stalled": 3}

    def funnel(self, since: datetime) -> Any:
        return [{"step": "session.created", "count": 7}, {"step": "purchase.created", "count": 3}]

    def hop_latencies(self, since: datetime) -> Any:
        return {"purchase.created": [0.1, 0.2, 0.3, 0.4], "trainer.allocated": [0.5, 1.5]}

    def stalled(self, limit: int) -> list[Any]:
        return [
            {
                "correlation_id": f"pay-s{i}",
                "step": "trainer.allocated",
                "overdue_by": timedelta(seconds=90 + i),
            }
            for i in range(3)
        ]

    def alerts(self, limit: int) -> list[Any]:
        return [
            {
                "correlation_id": "pay-s0",
                "step": "trainer.allocated",
                "status": "firing",
                "cause": "no_consumer",
                "evidence": "group allocation-worker has no members",
                "fired_at": T0,
            },
            {
                "correlation_id": "pay-r1",
                "step": "purchase.created",
                "status": "resolved",
                "cause": "consumer_lag",
                "fired_at": T0,
                "resolved_at": T0 + timedelta(minutes=2),
            },
        ]

    def step_order(self) -> list[str]:
        return list(STEPS)

    def pipeline(self) -> dict[str, Any]:
        return {
            "name": "payments",
            "steps": [
                {"id": s, "service": svc, "consumes": f"{s}-in" if i else None,
                 "emits": f"{STEPS[i + 1]}-in" if i + 1 < len(STEPS) else None,
                 "after": [STEPS[i - 1]] if i else [], "deadline_s": 30.0}
                for i, (s, svc) in enumerate(zip(STEPS, SERVICES, strict=True))
            ],
        }  # fmt: skip

    def stalled_counts(self) -> dict[str, int]:
        return {STEPS[2]: 3}

    def payments(self, params: dict[str, str]) -> dict[str, Any]:
        self.payment_params.append(dict(params))
        if params.get("state") == "bogus":
            raise BadFilter("unknown state 'bogus'")
        rows = [
            {"correlation_id": "pay-s0", "pipeline": "payments", "state": "stalled",
             "step": STEPS[2], "service": SERVICES[2], "cause": "no_consumer",
             "last_step": STEPS[1], "last_step_at": T0.isoformat(),
             "next_deadline": (T0 + timedelta(seconds=30)).isoformat(), "failed_at": None,
             "last_error": None, "first_seen": T0.isoformat(), "updated_at": T0.isoformat(),
             "completed_at": None},
            {"correlation_id": "pay-d0", "pipeline": "payments", "state": "completed",
             "step": None, "service": None, "cause": None, "last_step": STEPS[3],
             "last_step_at": T0.isoformat(), "next_deadline": None, "failed_at": None,
             "last_error": None, "first_seen": (T0 - timedelta(minutes=1)).isoformat(),
             "updated_at": T0.isoformat(), "completed_at": T0.isoformat()},
        ]  # fmt: skip
        if params.get("state"):
            rows = [r for r in rows if r["state"] in params["state"].split(",")]
        return {"items": rows, "next_cursor": "c1" if not params.get("cursor") else None}

    def jaeger_url(self) -> str:
        return "http://jaeger.test"
