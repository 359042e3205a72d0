"""The pipeline spec loader: the reference spec loads; every error names file, step and field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from hoptrace.contract import SpecError, load_spec, parse_duration

from ..support import REFERENCE_SPEC

GOOD = """
[pipeline]
name = "p"
correlation_key = "order_id"

[[steps]]
id = "a"
service = "svc-a"
emits = "t1"
deadline = "5s"

[[steps]]
id = "b"
service = "svc-b"
consumes = "t1"
group = "g-b"
table = "rows_b"
deadline = "30s"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipe.toml"
    path.write_text(text)
    return path


def test_reference_spec_loads() -> None:
    spec = load_spec(REFERENCE_SPEC)
    assert spec.name == "payments"
    assert spec.correlation_key == "payment_id"
    assert [s.id for s in spec] == [
        "payment.confirmed",
        "purchase.created",
        "trainer.allocated",
        "session.created",
    ]
    assert spec.step("trainer.allocated").group == "allocation-worker"
    assert spec.step("purchase.created").dlq == "purchase-confirmed.dlq"
    assert spec.next_step("trainer.allocated").id == "session.created"
    assert spec.next_step("session.created") is None
    assert spec.step_for_service("payment-service").emits == "purchase-confirmed"
    assert "trainer-allocated.dlq" in spec.topics
    assert spec.step("payment.confirmed").deadline == timedelta(seconds=5)


def test_good_spec(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.topics == ["t1", "t1.dlq"]
    assert spec.step("b").table == "rows_b"
    with pytest.raises(KeyError):
        spec.step("zzz")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'consumes = "t1"',
            'consumes = "t2"',
            ["step 'b'", "field 'consumes'", "'t2'", "not emitted by any earlier step"],
        ),
        ('id = "b"', 'id = "a"', ["step 'a'", "field 'id'", "duplicate step id"]),
        ('deadline = "30s"', 'deadline = "soon"', ["step 'b'", "field 'deadline'", "bad duration"]),
        (
            'deadline = "30s"',
            'deadline = "0s"',
            ["step 'b'", "field 'deadline'", "greater than zero"],
        ),
        ('deadline = "30s"', "", ["step 'b'", "field 'deadline'", "missing"]),
        ('group = "g-b"', "", ["step 'b'", "field 'group'", "needs a consumer group"]),
        ('table = "rows_b"', 'tabel = "rows_b"', ["step 'b'", "unknown key", "tabel"]),
        (
            'consumes = "t1"',
            'consumes = "bad topic!"',
            ["step 'b'", "field 'consumes'", "not a valid Kafka topic name"],
        ),
        ('service = "svc-b"', "", ["step 'b'", "field 'service'"]),
        ('name = "p"', "", ["field 'name'"]),
    ],
)
def test_errors_name_file_step_and_field(
    tmp_path: Path, old: str, new: str, expected: list[str]
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1) if old != 'id = "b"' else _dup(GOOD))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert msg.startswith(str(path))
    for part in expected:
        assert part in msg, msg


def _dup(text: str) -> str:
    head, _, tail = text.partition('id = "b"')
    return head + 'id = "a"' + tail


def test_step_after_first_must_consume(tmp_path: Path) -> None:
    text = GOOD.replace('consumes = "t1"\ngroup = "g-b"\n', "")
    with pytest.raises(SpecError, match=r"step 'b': field 'consumes': every step after the first"):
        load_spec(write(tmp_path, text))


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(write(tmp_path, "[pipeline\nname="))
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match=r"missing \[pipeline\]"):
        load_spec(write(tmp_path, "x = 1"))
    with pytest.raises(SpecError, match="field 'steps'"):
        load_spec(write(tmp_path, '[pipeline]\nname = "p"\n'))


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("7d", 604800)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds
