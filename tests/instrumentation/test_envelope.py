"""The event envelope: round trip, poison reasons, deterministic next-event ids."""

from __future__ import annotations

import json

import pytest

from hoptrace.instrumentation import Envelope, PoisonRecord, next_event_id


def test_round_trip() -> None:
    env = Envelope.new("PURCHASE_CONFIRMED", 1, "pay-1", {"amount": 5})
    back = Envelope.parse(env.to_bytes())
    assert back == env
    assert back.occurred_at.tzinfo is not None
    assert Envelope.new("X", 1, "c", {}).event_id != env.event_id
    assert Envelope.new("X", 1, "c", {}, event_id="e-1").event_id == "e-1"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"{oops", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (None, "empty"),
        (
            json.dumps({"type": "X", "version": 1, "occurred_at": "2026-01-01T00:00:00Z"}).encode(),
            "event_id",
        ),
        (
            json.dumps(
                {"event_id": "e", "type": "X", "version": 0, "occurred_at": "2026-01-01T00:00:00Z"}
            ).encode(),
            "version",
        ),
        (
            json.dumps(
                {"event_id": "e", "type": "X", "version": 1, "occurred_at": "yesterday"}
            ).encode(),
            "occurred_at",
        ),
        (
            json.dumps(
                {
                    "event_id": "e",
                    "type": "X",
                    "version": 1,
                    "occurred_at": "2026-01-01T00:00:00Z",
                    "payload": [1],
                }
            ).encode(),
            "payload",
        ),
    ],
)
def test_poison_reasons(data: bytes | None, reason: str) -> None:
    with pytest.raises(PoisonRecord) as err:
        Envelope.parse(data)
    assert reason in err.value.reason


@pytest.mark.parametrize("depth", [1_000, 5_000])
def test_deeply_nested_json_is_poison(depth: int) -> None:
    """Regression: ``json.loads`` of ``[`` x 1,000 (2 KB) raised RecursionError, which escaped
    ``parse``: the lane failed, the worker exited and read the same record again on restart."""
    for data in (b"[" * depth, b'{"payload": ' + b"[" * depth + b"]" * depth + b"}"):
        with pytest.raises(PoisonRecord) as err:
            Envelope.parse(data)
        assert "nested too deeply" in err.value.reason


def test_missing_correlation_is_left_to_the_runtime() -> None:
    raw = {"event_id": "e", "type": "X", "version": 1, "occurred_at": "2026-01-01T00:00:00Z"}
    env = Envelope.parse(json.dumps(raw).encode())
    assert env.correlation_id == ""
    assert env.with_correlation_id("c-9").correlation_id == "c-9"


def test_next_event_id_is_deterministic() -> None:
    a = next_event_id("src-1", "purchase.created")
    assert a == next_event_id("src-1", "purchase.created")
    assert a != next_event_id("src-1", "trainer.allocated")
    assert a != next_event_id("src-2", "purchase.created")
