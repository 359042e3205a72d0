"""Stall-scan leadership as a lease on the ``stall_scan`` heartbeat row.

One collector leads (scans, delivers alerts, runs retention): the one whose lease on the row has
not expired. The leader renews it at every scan, in the scan's own transaction, so a scan and its
alerts are written only under a valid lease (the row stays locked until they commit). A leader
that stops renewing (dead, frozen by SIGSTOP or a GC pause, cut off from the database) loses the
lease after ``ttl`` seconds and another replica takes it at its next scan.

Why not a session advisory lock (what was here before): PostgreSQL keeps it for as long as the
session lives, and a frozen process's session lives on (its kernel still answers TCP), so a hung
leader kept it and nobody scanned.

Each transaction that renews the lease also sets ``idle_in_transaction_session_timeout`` (the
server ends a session that sits in an open transaction longer than ``ttl``, so a leader frozen in
the middle of a scan frees the row), ``lock_timeout`` for the claim (a replica waiting for the
row gives up and tries again at its next scan) and ``statement_timeout``.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import asyncpg

_CLAIM = """
INSERT INTO stall_scan AS s (id, heartbeat, leader, lease_until)
VALUES (1, now(), $1, clock_timestamp() + make_interval(secs => $2))
ON CONFLICT (id) DO UPDATE
    SET heartbeat = excluded.heartbeat, leader = excluded.leader,
        lease_until = excluded.lease_until
    WHERE s.leader IS NULL OR s.leader = excluded.leader OR s.lease_until IS NULL
       OR s.lease_until < clock_timestamp()
RETURNING (SELECT heartbeat FROM stall_scan WHERE id = 1) AS previous, heartbeat AS now,
          (SELECT leader FROM stall_scan WHERE id = 1) AS was
"""
_RELEASE = "UPDATE stall_scan SET leader = NULL, lease_until = NULL WHERE id = 1 AND leader = $1"


def holder_id() -> str:
    """This replica's name in the lease: host, pid and a random part (replicas in one process
    are distinct too)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The scan lease, taken or renewed inside the caller's transaction (:meth:`claim`)."""

    def __init__(self, ttl: float, holder: str | None = None, statement_timeout: float = 30.0):
        self.ttl = ttl
        self.holder = holder or holder_id()
        self._valid_until = 0.0  # time.monotonic() until which the lease is surely ours
        ms = int(ttl * 1000)
        self._timeouts = (
            f"SET LOCAL idle_in_transaction_session_timeout = {max(ms, 1000)}; "
            f"SET LOCAL lock_timeout = {max(min(ms // 2, 2000), 200)}; "
            f"SET LOCAL statement_timeout = {int(max(statement_timeout, ttl) * 1000)}"
        )

    @property
    def held(self) -> bool:
        """True while the lease is ours by this process's own clock (it runs on while the
        process is stopped: a frozen leader wakes up knowing it may have lost the lease)."""
        return time.monotonic() < self._valid_until

    async def claim(self, conn: asyncpg.Connection) -> asyncpg.Record | None:
        """Take or renew the lease in ``conn``'s open transaction; the row's ``previous``
        heartbeat, the new one (``now``) and who held the lease before (``was``), or None when
        another replica holds it. Raises ``asyncpg.LockNotAvailableError`` when the row stayed
        locked (by a leader in the middle of its scan) past the lock timeout."""
        asked = time.monotonic()
        await conn.execute(self._timeouts)
        row: asyncpg.Record | None = await conn.fetchrow(_CLAIM, self.holder, self.ttl)
        # measured from before the request: the database's expiry is later than ours
        self._valid_until = asked + self.ttl if row is not None else 0.0
        if row is not None:  # the scan itself may wait for a row (up to its statement timeout)
            await conn.execute("SET LOCAL lock_timeout = 0")
        return row

    def lost(self) -> None:
        self._valid_until = 0.0

    async def release(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        """Give the lease up (a clean stop): another replica takes it at its next scan."""
        self._valid_until = 0.0
        await conn.execute(_RELEASE, self.holder)
