"""``hoptrace redrive``'s command line: bad input exits 2 before anything is read, and the text
report says per payment what would be (or was) done and what was refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hoptrace.cli import app
from hoptrace.repair.apply import Applied
from hoptrace.repair.cli import to_text
from hoptrace.repair.plan import Action, Kind, StoredRecord
from hoptrace.repair.runner import PaymentReport, Report

REC = StoredRecord("purchase-created.dlq[0]@3", b"{}")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "give one payment id, or --stuck"),
        (["pay-1", "--stuck"], "give one payment id, or --stuck"),
        (["DROP TABLE x"], "correlation id"),
        (["--stuck", "--since", "1x"], "bad duration"),
        (["--stuck", "--step", "nope"], "unknown step 'nope'"),
        (["--stuck", "--cause", "nope"], "unknown cause 'nope'"),
        (["pay-1", "--cause", "no_consumer"], "go with --stuck"),
    ],
)
def test_bad_input_exits_2_saying_why(args: list[str], says: str) -> None:
    res = CliRunner().invoke(app, ["redrive", *args])
    assert res.exit_code == 2, res.output
    assert says in res.output


def _report(applied: bool) -> Report:
    send = Action(
        "pay-1",
        "trainer.allocated",
        "downstream_error",
        Kind.REPUBLISH_DEAD_LETTER,
        "the dead-lettered record",
        REC,
        "purchase-created",
    )
    refuse = Action(
        "pay-2",
        "purchase.created",
        "not_emitted",
        Kind.REFUSE,
        "payment_outbox has no event for pay-2",
    )
    one = PaymentReport("pay-1", True, "failed", "downstream_error", "trainer.allocated", [send])
    two = PaymentReport("pay-2", True, "stalled", "not_emitted", "purchase.created", [refuse])
    if applied:
        one.applied = [Applied(send, "sent", 7, ("purchase-created", 0, 9), "ab" * 16)]
        two.applied = [Applied(refuse, "refused", 8, detail=refuse.reason)]
    return Report(applied, [one, two])


def test_text_report_of_a_dry_run_and_of_an_applied_run() -> None:
    dry = to_text(_report(False))
    assert "dry run (nothing sent" in dry
    assert "trainer.allocated: would send purchase-created.dlq[0]@3 to purchase-created" in dry
    assert "purchase.created: REFUSED: payment_outbox has no event for pay-2" in dry
    assert "2 payment(s): 1 to send, 0 with nothing to do, 1 refused, 0 failed" in dry
    done = _report(True)
    text = to_text(done)
    assert "sent purchase-created.dlq[0]@3 as purchase-created[0]@9 (redrive #7" in text
    assert "1 sent" in text and done.exit_code == 1  # a refusal: not all was done
    assert done.to_dict()["payments"][0]["actions"][0]["sent"]["offset"] == 9
