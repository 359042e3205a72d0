"""Fault switches: each reproduces one failure from the incident so diagnosis can be tested
against the real thing. Set with `hoptrace dev start NAME --fault FAULT` or ``HOPTRACE_FAULT``.

- admin-service ``http-500``: every allocation request answers 500.
- admin-service ``silent-no-write``: answers 200 with a trainer but writes no row.
- allocation-worker ``no-verify``: the legacy mark-before-verify (marks processed without
  checking the allocation row exists).
- allocation-worker ``wrong-group``: consumes under the group ``<group>-v2`` instead of the spec's,
  starting at the end of the log (a new group's default): earlier records are never handled.
- allocation-worker ``slow``: waits :data:`SLOW_DELAY_S` before handling each record (lag).
- any worker ``crash-after-write``: the process exits right after its DB commit, before the
  emit and the offset commit (a restart must finish the chain without a second row).
- payment-service ``skip-emit``: the payment row is written, the event is never emitted.

"Worker not started" and "topic missing" need no switch: `hoptrace dev stop NAME` and not running
`hoptrace topics ensure` (or deleting the topic) reproduce them.
"""

from __future__ import annotations

import os

HTTP_500 = "http-500"
SILENT_NO_WRITE = "silent-no-write"
NO_VERIFY = "no-verify"
WRONG_GROUP = "wrong-group"
SLOW = "slow"
CRASH_AFTER_WRITE = "crash-after-write"
SKIP_EMIT = "skip-emit"

ENV_VAR = "HOPTRACE_FAULT"
SLOW_DELAY_S = float(os.environ.get("HOPTRACE_SLOW_DELAY_S", "3.0"))
WRONG_GROUP_SUFFIX = "-v2"

FAULTS: dict[str, tuple[str, ...]] = {
    "payment-service": (SKIP_EMIT, CRASH_AFTER_WRITE),
    "purchase-worker": (CRASH_AFTER_WRITE,),
    "allocation-worker": (NO_VERIFY, WRONG_GROUP, SLOW, CRASH_AFTER_WRITE),
    "session-worker": (CRASH_AFTER_WRITE,),
    "admin-service": (HTTP_500, SILENT_NO_WRITE),
}


def validate_fault(name: str, fault: str | None) -> str | None:
    """``fault`` if ``name`` supports it (None/"" means no fault); ValueError listing the allowed."""
    if not fault:
        return None
    allowed = FAULTS.get(name)
    if not allowed:
        with_faults = ", ".join(FAULTS)
        raise ValueError(f"{name} has no fault switches (services that do: {with_faults})")
    if fault not in allowed:
        raise ValueError(f"unknown fault {fault!r} for {name}; allowed: {', '.join(allowed)}")
    return fault


def current_fault(name: str) -> str | None:
    """The fault switched on for ``name`` by the environment (validated)."""
    return validate_fault(name, os.environ.get(ENV_VAR, "").strip() or None)
