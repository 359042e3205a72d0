"""purchase-worker: PURCHASE_CONFIRMED -> a ``student_course_purchases`` row (source: the
payment) -> PURCHASE_CREATED."""

from __future__ import annotations

import json

from hoptrace.instrumentation.hop import Emit, HopContext

from . import faults
from .events import (
    PURCHASE_CONFIRMED,
    PURCHASE_CREATED,
    PurchaseConfirmedV1,
    PurchaseCreatedV1,
    payload_of,
)
from .service import HopWorker, plain


async def handle(ctx: HopContext) -> Emit:
    event = payload_of(ctx.envelope)
    assert isinstance(event, PurchaseConfirmedV1)
    metadata = {
        "source": "payment",
        "payment_id": event.payment_id,
        "event_id": ctx.envelope.event_id,
    }
    purchase_id = await ctx.conn.fetchval(
        """INSERT INTO student_course_purchases (correlation_id, payment_id, student, course, metadata)
           VALUES ($1, $2, $3, $4, $5::jsonb)
           ON CONFLICT (correlation_id) DO UPDATE SET correlation_id = EXCLUDED.correlation_id
           RETURNING id""",
        ctx.correlation_id,
        event.payment_id,
        event.student,
        event.course,
        json.dumps(metadata),
    )
    payload = PurchaseCreatedV1(
        payment_id=event.payment_id,
        purchase_id=purchase_id,
        student=event.student,
        course=event.course,
    )
    return Emit(PURCHASE_CREATED, payload.model_dump(mode="json"))


SERVICE = HopWorker(
    name="purchase-worker",
    consumes=PURCHASE_CONFIRMED,
    handler=plain(handle),
    faults=(faults.CRASH_AFTER_WRITE,),
)
