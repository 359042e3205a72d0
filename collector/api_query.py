"""The read API's query parameters: parsed and checked before anything reaches the store, each
bad one refused with a message saying what is wrong and what is accepted (the API answers 400).

Times (``since``, ``until``) are ISO 8601 (``2026-11-27T02:00:00Z``; without an offset: UTC) or a
duration back from now (``15m``, ``6h``, ``7d``). The list cursor is opaque to clients: the
(first_seen, correlation_id) of the last row of the page, base64url-encoded JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hoptrace.contract import CAUSES, STATES, PipelineSpec, parse_duration
from hoptrace.ids import is_valid_correlation_id

#: Rows per page: the default and the most a client may ask for.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: The filters ``GET /correlations`` takes.
LIST_PARAMS = ("state", "step", "cause", "service", "since", "until", "limit", "cursor")


class BadQuery(ValueError):
    """A query parameter the API refuses (400); the message names it and what it accepts."""


@dataclass(frozen=True, slots=True)
class ListQuery:
    """``GET /correlations``'s filters, checked. ``steps``: the steps named by ``step`` and by
    ``service`` (a service's steps), intersected when both are given (then possibly none:
    ``nothing`` is True and the answer is empty)."""

    states: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    cause: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = DEFAULT_LIMIT
    after: tuple[datetime, str] | None = None
    nothing: bool = False


def _values(params: Mapping[str, str], name: str) -> list[str]:
    raw = params.get(name, "")
    return [v.strip() for v in raw.split(",") if v.strip()]


def _one_of(name: str, values: list[str], allowed: list[str]) -> tuple[str, ...]:
    for v in values:
        if v not in allowed:
            raise BadQuery(f"unknown {name} {v!r}: use one of {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def parse_time(name: str, text: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when it names no offset) or a duration back from ``now``."""
    text = text.strip()
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    value = None
    # a "+" of an offset arrives as a space when the client did not encode it
    for candidate in (text, text.replace(" ", "+")):
        try:
            value = datetime.fromisoformat(candidate.replace("Z", "+00:00"))
            break
        except ValueError:
            continue
    if value is None:
        raise BadQuery(
            f"bad {name} {text!r}: use an ISO 8601 time (2026-11-27T02:00:00Z) or a duration "
            "back from now (15m, 6h, 7d)"
        )
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_limit(text: str | None, default: int = DEFAULT_LIMIT, most: int = MAX_LIMIT) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadQuery(f"bad limit {text!r}: use a whole number from 1 to {most}") from None
    if not 1 <= value <= most:
        raise BadQuery(f"bad limit {value}: use a whole number from 1 to {most}")
    return value


def encode_cursor(first_seen: datetime, correlation_id: str) -> str:
    """The opaque cursor after a row (microsecond precision, as stored)."""
    us = (first_seen - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    raw = json.dumps([us, correlation_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        us, cid = json.loads(raw)
        if not isinstance(us, int) or not is_valid_correlation_id(cid):
            raise ValueError("not a cursor")
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us), cid
    except (ValueError, TypeError, binascii.Error, OverflowError):
        raise BadQuery(
            "bad cursor: pass the next_cursor of a previous page unchanged (or omit it)"
        ) from None


def parse_list_query(
    params: Mapping[str, str], spec: PipelineSpec, now: datetime | None = None
) -> ListQuery:
    """The checked filters of ``GET /correlations`` (BadQuery for any bad or unknown one)."""
    now = now or datetime.now(UTC)
    unknown = sorted(set(params) - set(LIST_PARAMS))
    if unknown:
        raise BadQuery(
            f"unknown parameter {', '.join(unknown)}: the filters are {', '.join(LIST_PARAMS)}"
        )
    step_ids = [s.id for s in spec.steps]
    states = _one_of("state", _values(params, "state"), list(STATES))
    steps = _one_of("step", _values(params, "step"), step_ids)
    services = _one_of("service", _values(params, "service"), list(dict.fromkeys(spec.services)))
    causes = _one_of("cause", _values(params, "cause"), list(CAUSES))
    if len(causes) > 1:
        raise BadQuery("cause takes one cause code")
    nothing = False
    if services:
        of_services = tuple(s.id for s in spec.steps if s.service in services)
        if steps:
            steps = tuple(s for s in steps if s in of_services)
            nothing = not steps
        else:
            steps = of_services
    since = parse_time("since", params["since"], now) if params.get("since") else None
    until = parse_time("until", params["until"], now) if params.get("until") else None
    if since is not None and until is not None and since >= until:
        raise BadQuery(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")
    cursor = params.get("cursor")
    return ListQuery(
        states=states,
        steps=steps,
        cause=causes[0] if causes else None,
        since=since,
        until=until,
        limit=parse_limit(params.get("limit")),
        after=decode_cursor(cursor) if cursor else None,
        nothing=nothing,
    )
