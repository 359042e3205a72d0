"""Plain words the pages show: one sentence per cause code (the contract's ``Cause.meaning``) and
the name of what the pipeline carries (one correlation is one payment)."""

from __future__ import annotations

from hoptrace.contract import Cause

#: Cause code -> one sentence a person reads.
CAUSES: dict[str, str] = {c.value: c.meaning for c in Cause}

#: What one correlation is called in the pages, and many of them (table columns, axis titles).
ITEM = "payment"
ITEMS = "payments"


def cause_words(code: str | None) -> str:
    """A one-sentence explanation of a cause code; unknown codes are shown as they are."""
    if not code:
        return "No cause could be determined."
    return CAUSES.get(code, f"Cause: {code}.")
