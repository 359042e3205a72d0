"""Fault switches: each reproduces one failure from the incident so the diagnosis can be tested
against the real thing. Set with `hoptrace dev start NAME --fault FAULT`, `hoptrace worker NAME
--fault FAULT` or ``HOPTRACE_FAULT``; which service has which: :mod:`.registry` (each service
declares its own, with one line saying what it does).

A fault is a hook the runner applies (:mod:`.run`), never a branch in a service's business code.
This module holds the hop workers' faults and what any fault needs at run time:

- ``crash-after-write`` (any worker): the process exits (:func:`crash`, exit code
  :data:`CRASH_EXIT_CODE`) right after its DB commit, before the emit and the offset commit;
  a restart must finish the chain without a second row;
- ``slow``: waits ``HOPTRACE_SLOW_DELAY_S`` (default 3 s) before handling each record (lag);
- ``no-verify``: the legacy mark-before-verify (marks processed without checking the effect row);
- ``wrong-group``: consumes under ``<group>-v2`` (:data:`WRONG_GROUP_SUFFIX`) instead of the
  spec's group, from the end of the log (a new group's default): earlier records are never
  handled.

"Worker not started" and "topic missing" need no switch: `hoptrace dev stop NAME` and not running
`hoptrace topics ensure` (or deleting the topic) reproduce them.
"""

from __future__ import annotations

import asyncio
import os
from typing import NoReturn

from hoptrace.instrumentation.hop import HopContext
from hoptrace.settings import get_worker_settings

from .service import Fault, HopSetup

CRASH_EXIT_CODE = 17
WRONG_GROUP_SUFFIX = "-v2"


def crash() -> NoReturn:
    """Die like a killed process: no cleanup, no flush, no offset commit."""
    os._exit(CRASH_EXIT_CODE)


def slow_delay_s() -> float:
    """How long the ``slow`` fault waits before each record (``HOPTRACE_SLOW_DELAY_S``)."""
    return get_worker_settings().slow_delay_s


async def _crash_after_commit(_ctx: HopContext) -> None:
    crash()


async def _wait_before_handling(_ctx: HopContext) -> None:
    await asyncio.sleep(slow_delay_s())


def _wrong_group(setup: HopSetup) -> HopSetup:
    # A misconfigured deployment: a new group starts at the end of the log, as Kafka clients do
    # by default, so records produced before it joined are never handled.
    group = setup.options.group or setup.step.group or setup.step.id
    return setup.with_options(group=group + WRONG_GROUP_SUFFIX, auto_offset_reset="latest")


CRASH_AFTER_WRITE: Fault[HopSetup] = Fault(
    "crash-after-write",
    "exits after its DB commit, before the emit and the offset commit",
    lambda setup: setup.with_hooks(after_db_commit=_crash_after_commit),
)
SLOW: Fault[HopSetup] = Fault(
    "slow",
    "waits HOPTRACE_SLOW_DELAY_S (default 3 s) before each record: its consumer lags",
    lambda setup: setup.with_hooks(before_handle=_wait_before_handling),
)
NO_VERIFY: Fault[HopSetup] = Fault(
    "no-verify",
    "the legacy mark-before-verify: marks processed without checking the effect row",
    lambda setup: setup.with_options(verify_effect=False),
)
WRONG_GROUP: Fault[HopSetup] = Fault(
    "wrong-group",
    f"consumes under <group>{WRONG_GROUP_SUFFIX} from the end of the log: earlier records are "
    "never handled",
    _wrong_group,
)

#: Fault switches that run a worker under another consumer group than its spec's: fault name ->
#: the group it uses (``{group}``: the spec's), for `hoptrace check deploy`.
GROUP_FAULTS: dict[str, str] = {WRONG_GROUP.name: "{group}" + WRONG_GROUP_SUFFIX}
