"""session-worker: TRAINER_ALLOCATED -> a ``tutoring_sessions`` row (the last step: no emit)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hoptrace.instrumentation.hop import HopContext

from . import faults
from .events import TRAINER_ALLOCATED, TrainerAllocatedV1, payload_of
from .service import HopWorker, plain


def first_session_time(now: datetime) -> datetime:
    """Next day, 09:00 UTC."""
    day = (now + timedelta(days=1)).date()
    return datetime(day.year, day.month, day.day, 9, 0, tzinfo=UTC)


async def handle(ctx: HopContext) -> None:
    event = payload_of(ctx.envelope)
    assert isinstance(event, TrainerAllocatedV1)
    await ctx.conn.execute(
        """INSERT INTO tutoring_sessions (correlation_id, student, course, trainer, starts_at)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (correlation_id) DO NOTHING""",
        ctx.correlation_id,
        event.student,
        event.course,
        event.trainer,
        first_session_time(datetime.now(UTC)),
    )
    return None


SERVICE = HopWorker(
    name="session-worker",
    consumes=TRAINER_ALLOCATED,
    handler=plain(handle),
    faults=(faults.CRASH_AFTER_WRITE,),
)
