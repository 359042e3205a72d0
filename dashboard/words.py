"""Plain words for the diagnosis cause codes (DESIGN.md) and correlation states."""

from __future__ import annotations

CAUSES: dict[str, str] = {
    "completed": "Every step finished: the payment went all the way through the pipeline.",
    "in_progress": "The payment is still moving: the next step is not overdue yet.",
    "topic_missing": "The topic this step reads from does not exist, so the event had nowhere to go.",
    "no_consumer": "Nobody is consuming the topic: the step's consumer group has no running members.",
    "consumer_lag": "The event is waiting in the topic: the consumer group is behind (lag) and has not reached it yet.",
    "processing_error": "The worker received the event but failed while handling it.",
    "downstream_error": "The worker called a downstream service, and that call failed.",
    "marked_without_effect": "The event was marked processed, but the row it should have written does not exist.",
    "not_emitted": "The previous step finished but never emitted the event for this step.",
    "missing_evidence": "hoptrace could not read a source it needs to decide (see the evidence below), so it does not guess.",
    "consumed_without_trace": "The event was consumed (offset committed) but no span was recorded: an uninstrumented consumer or another code path handled it.",
}


def cause_words(code: str | None) -> str:
    """A one-sentence explanation of a cause code; unknown codes are shown as they are."""
    if not code:
        return "No cause could be determined."
    return CAUSES.get(code, f"Cause: {code}.")
