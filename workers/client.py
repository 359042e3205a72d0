"""`hoptrace pay` (one payment; its id alone on the last stdout line) and
`hoptrace demo traffic --rate R --count N` (paced load against payment-service)."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from hoptrace.settings import get_settings

from .http import ERROR_KEY


def payment_service_url() -> str:
    s = get_settings()
    return (s.payment_service_url or f"http://{s.bind_host}:{s.payment_service_port}").rstrip("/")


class PaymentError(Exception):
    """payment-service refused the payment or could not be reached (message says which)."""


async def submit(
    client: httpx.AsyncClient,
    student: str,
    course: str,
    amount: str,
    idempotency_key: str | None = None,
) -> str:
    """POST one payment; its id, or :class:`PaymentError`. With ``idempotency_key`` a retry
    (same key, same payment) gets the first payment's id, never a second payment."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    try:
        resp = await client.post(
            "/payments",
            json={"student": student, "course": course, "amount": amount},
            headers=headers,
        )
    except httpx.HTTPError as exc:
        raise PaymentError(
            f"payment-service is not reachable at {client.base_url} ({type(exc).__name__}); "
            "start it with `hoptrace dev up`"
        ) from None
    if resp.status_code != 201:
        try:
            detail = resp.json().get(ERROR_KEY, resp.text)
            field = resp.json().get("field")
        except ValueError:
            detail, field = resp.text, None
        where = f" (field {field})" if field else ""
        raise PaymentError(f"payment refused: HTTP {resp.status_code}: {detail}{where}")
    return str(resp.json()["payment_id"])


def pay_cli(student: str, course: str, amount: str) -> None:
    """Submit one payment; print its id alone on the last line (exit 2 when refused/unreachable)."""

    async def run() -> str:
        async with httpx.AsyncClient(base_url=payment_service_url(), timeout=10.0) as client:
            return await submit(client, student, course, amount)

    try:
        payment_id = asyncio.run(run())
    except PaymentError as exc:
        print(f"hoptrace: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"payment submitted: student {student}, course {course}, amount {amount}")
    print(f"look it up with: hoptrace trace {payment_id}")
    print(payment_id)


async def at_rate(count: int, rate: float, one: Callable[[], Awaitable[None]]) -> float:
    """Start ``one()`` ``count`` times, steadily ``rate`` per second, and wait for all of them;
    returns the seconds taken."""
    t0 = time.monotonic()
    tasks = []
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return time.monotonic() - t0


async def traffic(
    rate: float, count: int, *, url: str | None = None, concurrency: int = 200
) -> dict[str, object]:
    """``count`` payments at ``rate``/s (random student/course). Returns ids, failures, timings."""
    if rate <= 0 or count < 0:
        raise ValueError("rate must be > 0 and count >= 0")
    ids: list[str] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url or payment_service_url(), timeout=30.0, limits=limits
    ) as client:

        async def one() -> None:
            async with sem:
                student = f"student-{random.randint(1, 100)}"
                course = f"course-{random.randint(1, 20)}"
                try:
                    ids.append(
                        await submit(client, student, course, f"{random.randint(10, 200)}.00")
                    )
                except PaymentError as exc:
                    errors.append(str(exc))

        took = await at_rate(count, rate, one)
    return {"ids": ids, "errors": errors, "seconds": took}


def traffic_cli(rate: float, count: int) -> None:
    """Print each payment id as it is accepted, then a summary (exit 2 if any failed)."""
    try:
        result = asyncio.run(traffic(rate, count))
    except ValueError as exc:
        print(f"hoptrace: {exc}", file=sys.stderr)
        sys.exit(2)
    for payment_id in result["ids"]:  # type: ignore[union-attr]
        print(payment_id)
    errors: list[str] = result["errors"]  # type: ignore[assignment]
    ok = len(result["ids"])  # type: ignore[arg-type]
    print(
        f"{ok} payments accepted, {len(errors)} failed in {result['seconds']:.1f}s", file=sys.stderr
    )
    if errors:
        print(f"hoptrace: first failure: {errors[0]}", file=sys.stderr)
        sys.exit(2)
