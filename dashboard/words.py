"""Plain words the pages show: one sentence per cause code (the contract's ``Cause.meaning``), a
few words per cause, step status and payment state instead of their codes, "—" for nothing, and
the name of what the pipeline carries (one correlation is one payment)."""

from __future__ import annotations

from typing import Any

from hoptrace.contract import Cause, State, StepStatus

#: Cause code -> one sentence a person reads.
CAUSES: dict[str, str] = {c.value: c.meaning for c in Cause}

#: What one correlation is called in the pages, and many of them (table columns, axis titles).
ITEM = "payment"
ITEMS = "payments"
#: What the pages show where there is no value (instead of ``None``).
NOTHING = "—"

#: Step status -> words.
STATUS_WORDS: dict[str, str] = {
    StepStatus.DONE.value: StepStatus.DONE.value,  # the same word
    StepStatus.FAILED.value: StepStatus.FAILED.value,
    StepStatus.PENDING.value: "waiting (not overdue)",
    StepStatus.STALLED.value: "stalled (overdue)",
    StepStatus.NOT_REACHED.value: "not reached yet",
}
#: Payment state -> words.
STATE_WORDS: dict[str, str] = {
    State.COMPLETED.value: State.COMPLETED.value,  # the same word
    State.IN_PROGRESS.value: "in progress",
    State.STALLED.value: State.STALLED.value,
    State.FAILED.value: State.FAILED.value,
}


def cause_words(code: str | None) -> str:
    """A one-sentence explanation of a cause code; unknown codes are shown as they are."""
    if not code:
        return "No cause could be determined."
    return CAUSES.get(code, f"Cause: {code}.")


def cause_title(code: str | None) -> str:
    """A few words for a cause code (a table cell); ``—`` for none."""
    if not code:
        return NOTHING
    try:
        return Cause(code).title
    except ValueError:
        return str(code)


def status_words(status: str | None) -> str:
    return STATUS_WORDS.get(str(status), str(status)) if status else NOTHING


def state_words(state: str | None) -> str:
    return STATE_WORDS.get(str(state), str(state).replace("_", " ")) if state else NOTHING


def shown(value: Any) -> str:
    """A value as a table cell: ``—`` for None or empty, else its text."""
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return NOTHING
    return str(value)
