"""The reference pipeline's events: typed, versioned payloads carried in the one
:class:`~hoptrace.instrumentation.envelope.Envelope`. A record whose type, version or payload does
not match what a step consumes is a poison record (dead-letter topic), never a crash."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hoptrace.instrumentation.envelope import Envelope, PoisonRecord

PURCHASE_CONFIRMED = "PURCHASE_CONFIRMED"
PURCHASE_CREATED = "PURCHASE_CREATED"
TRAINER_ALLOCATED = "TRAINER_ALLOCATED"


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PurchaseConfirmedV1(_Payload):
    """payment-service -> purchase-worker: a payment succeeded."""

    payment_id: str = Field(min_length=1)
    student: str = Field(min_length=1)
    course: str = Field(min_length=1)
    amount: Decimal = Field(gt=0)


class PurchaseCreatedV1(_Payload):
    """purchase-worker -> allocation-worker: the student owns the course."""

    payment_id: str = Field(min_length=1)
    purchase_id: int
    student: str = Field(min_length=1)
    course: str = Field(min_length=1)


class TrainerAllocatedV1(_Payload):
    """allocation-worker -> session-worker: a trainer is allocated."""

    payment_id: str = Field(min_length=1)
    student: str = Field(min_length=1)
    course: str = Field(min_length=1)
    trainer: str = Field(min_length=1)


#: (type, version) -> payload model. Add a version here; never change a released one.
PAYLOADS: dict[tuple[str, int], type[_Payload]] = {
    (PURCHASE_CONFIRMED, 1): PurchaseConfirmedV1,
    (PURCHASE_CREATED, 1): PurchaseCreatedV1,
    (TRAINER_ALLOCATED, 1): TrainerAllocatedV1,
}


def payload_of(envelope: Envelope) -> _Payload:
    """The envelope's payload as its typed model; :class:`PoisonRecord` when it cannot be."""
    model = PAYLOADS.get((envelope.type, envelope.version))
    if model is None:
        raise PoisonRecord(f"unknown event type/version {envelope.type} v{envelope.version}")
    try:
        return model.model_validate(envelope.payload)
    except ValidationError as exc:
        raise PoisonRecord(f"{envelope.type} v{envelope.version}: bad payload: {exc}") from exc


def validator(expected_type: str) -> Callable[[Envelope], None]:
    """A ``validate=`` callback for a step that consumes ``expected_type`` events."""

    def validate(envelope: Envelope) -> None:
        if envelope.type != expected_type:
            raise PoisonRecord(f"expected {expected_type}, got {envelope.type}")
        payload_of(envelope)

    return validate


def new_event(
    event_type: str, correlation_id: str, payload: _Payload, version: int = 1
) -> Envelope:
    """A fresh envelope for ``payload`` (checked against the registered model)."""
    model = PAYLOADS[(event_type, version)]
    if not isinstance(payload, model):
        raise TypeError(f"{event_type} v{version} needs a {model.__name__} payload")
    return Envelope.new(event_type, version, correlation_id, payload.model_dump(mode="json"))
