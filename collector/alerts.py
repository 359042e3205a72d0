"""Alert delivery from the ``alerts`` table (outbox): Alertmanager v2 API and/or a plain webhook
in Alertmanager's webhook JSON (version 4). Undelivered events are retried with exponential
backoff (1s .. 5min), so a receiver that is down loses no alert. Run by the scan leader only.
Firing alerts are re-sent to Alertmanager every ``resend_interval`` (as Prometheus does), else
Alertmanager would resolve them after its ``resolve_timeout``; the webhook gets each event once.

Two kinds of alert (``alerts.kind``): a stalled correlation (``HoptraceStalledCorrelation``) and a
failed one, whose step errored for good, e.g. was dead-lettered (``HoptraceFailedCorrelation``).

Firing alerts wait for their diagnosis (``diagnosed``) for at most ``diagnosis_wait`` seconds.

Deliveries are claimed: a dispatcher marks the alerts it is about to send as its own for
``claim_seconds`` (``claimed_by``/``claimed_until``, taken with ``FOR UPDATE SKIP LOCKED``), checks
the claim again right before each send and records the outcome only under it, so two collectors
(say a frozen leader that wakes up beside its successor) never both send one event. A claim left
by a dispatcher that died runs out, and the event is sent by the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx

from hoptrace.contract import Outcome, State

from . import metrics
from .lease import holder_id

#: ``hoptrace_alert_deliveries{result=...}``: a delivery's outcome, in the words of a step's.
_DELIVERED, _FAILED_DELIVERY = Outcome.OK.value, Outcome.ERROR.value

log = logging.getLogger("hoptrace.collector.alerts")

ALERTNAME = "HoptraceStalledCorrelation"
ALERTNAME_FAILED = "HoptraceFailedCorrelation"
_FAILED = State.FAILED.value
_ZERO_TIME = "0001-01-01T00:00:00Z"

#: Claim what is due ($3: this dispatcher, $4: claim seconds); rows claimed by another
#: dispatcher whose claim has not run out are skipped.
_DUE = """
WITH due AS (
    SELECT a.id FROM alerts a
    WHERE (NOT a.delivered_firing OR (a.status = 'resolved' AND NOT a.delivered_resolved))
      AND a.next_attempt_at <= now()
      AND (a.diagnosed OR a.status = 'resolved' OR a.fired_at < now() - make_interval(secs => $1))
      AND (a.claimed_until IS NULL OR a.claimed_until < clock_timestamp())
    ORDER BY a.next_attempt_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE alerts a SET claimed_by = $3, claimed_until = clock_timestamp() + make_interval(secs => $4)
FROM due WHERE a.id = due.id
RETURNING a.*, (SELECT s.trace_id FROM spans s WHERE s.correlation_id = a.correlation_id
                ORDER BY s.start_time LIMIT 1) AS trace_id
"""
#: Still ours? Extends the claim; no row when it ran out and another dispatcher took it.
_RECLAIM = """
UPDATE alerts SET claimed_until = clock_timestamp() + make_interval(secs => $3)
WHERE id = $1 AND claimed_by = $2 AND claimed_until > clock_timestamp()
RETURNING id
"""
_CLEAR = (
    "UPDATE alerts SET claimed_by = NULL, claimed_until = NULL WHERE id = $1 AND claimed_by = $2"
)
#: Firing alerts due for a re-send to Alertmanager, marked sent first (a re-send is claimed by
#: moving ``last_sent_at``: another dispatcher does not pick the same ones).
_RESEND = """
WITH due AS (
    SELECT a.id FROM alerts a
    WHERE a.status = 'firing' AND a.delivered_firing
      AND a.last_sent_at < now() - make_interval(secs => $1)
    ORDER BY a.last_sent_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE alerts a SET last_sent_at = now() FROM due WHERE a.id = due.id
RETURNING a.*, NULL::text AS trace_id
"""


@dataclass(frozen=True, slots=True)
class Targets:
    alertmanager_url: str | None
    webhook_url: str | None
    dashboard_url: str
    jaeger_url: str | None  # None: no Jaeger configured, no link

    @property
    def any(self) -> bool:
        return bool(self.alertmanager_url or self.webhook_url)


def redact(text: str, urls: tuple[str | None, ...]) -> str:
    """``text`` without the secret parts of ``urls`` (a webhook's path and query are its token,
    e.g. Slack's; a password may sit in the userinfo): each URL is cut to scheme://host:port."""
    for url in urls:
        if not url:
            continue
        parts = urlsplit(url)
        shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
        text = text.replace(url.rstrip("/"), f"{shown}/<redacted>")
        for secret in (parts.password, parts.query, parts.path if len(parts.path) > 1 else None):
            if secret:
                text = text.replace(secret, "<redacted>")
    return text


def _iso(t: datetime | None) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z") if t else _ZERO_TIME


def alert_body(a: dict[str, Any], t: Targets) -> dict[str, Any]:
    """One alert in Alertmanager's model (labels, annotations, startsAt, endsAt, generatorURL)."""
    failed = a.get("kind") == _FAILED
    labels = {
        "alertname": ALERTNAME_FAILED if failed else ALERTNAME,
        "pipeline": a.get("pipeline") or "",
        "step": a.get("step") or "",
        "correlation_id": a["correlation_id"],
    }
    dash = f"{t.dashboard_url.rstrip('/')}/?id={a['correlation_id']}"
    annotations = {
        "summary": f"correlation {a['correlation_id']} failed at step {a.get('step')}"
        if failed
        else f"correlation {a['correlation_id']} stalled before step {a.get('step')}",
        "cause": a.get("cause") or "",
        "evidence": a.get("evidence") or "",
        "dashboard_url": dash,
        "jaeger_url": f"{t.jaeger_url.rstrip('/')}/trace/{a['trace_id']}"
        if a.get("trace_id") and t.jaeger_url
        else "",
    }
    resolved = a["status"] == "resolved"
    return {
        "status": "resolved" if resolved else "firing",
        "labels": labels,
        "annotations": {k: v for k, v in annotations.items() if v},
        "startsAt": _iso(a["fired_at"]),
        "endsAt": _iso(a["resolved_at"]) if resolved else _ZERO_TIME,
        "generatorURL": dash,
        "fingerprint": hashlib.sha256(repr(sorted(labels.items())).encode()).hexdigest()[:16],
    }


def alertmanager_payload(a: dict[str, Any], t: Targets) -> list[dict[str, Any]]:
    """Body for ``POST /api/v2/alerts`` (postableAlerts)."""
    body = alert_body(a, t)
    out = {k: body[k] for k in ("labels", "annotations", "startsAt", "generatorURL")}
    if body["status"] == "resolved":
        out["endsAt"] = body["endsAt"]
    return [out]


def webhook_payload(a: dict[str, Any], t: Targets) -> dict[str, Any]:
    """Alertmanager's webhook JSON (version 4) for one alert."""
    body = alert_body(a, t)
    labels = body["labels"]
    name = labels["alertname"]
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{name}", correlation_id="{a["correlation_id"]}"}}',
        "truncatedAlerts": 0,
        "status": body["status"],
        "receiver": "hoptrace",
        "groupLabels": {"alertname": name, "correlation_id": a["correlation_id"]},
        "commonLabels": labels,
        "commonAnnotations": body["annotations"],
        "externalURL": t.dashboard_url,
        "alerts": [body],
    }


class AlertDispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        targets: Targets,
        is_leader: Callable[[], bool],
        interval: float = 1.0,
        diagnosis_wait: float = 30.0,
        timeout: float = 5.0,
        resend_interval: float = 60.0,
        claim_seconds: float | None = None,
    ) -> None:
        self.resend_interval = resend_interval
        #: long enough for the sends of one alert (up to three requests of ``timeout``)
        self.claim_seconds = claim_seconds if claim_seconds is not None else 4 * timeout + 10
        self.name = holder_id()
        self.pool = pool
        self.targets = targets
        self.is_leader = is_leader
        self.interval = interval
        self.diagnosis_wait = diagnosis_wait
        self.client = httpx.AsyncClient(timeout=timeout)

    async def _send(self, a: dict[str, Any], webhook: bool = True) -> None:
        t = self.targets
        if t.alertmanager_url:
            r = await self.client.post(
                f"{t.alertmanager_url.rstrip('/')}/api/v2/alerts", json=alertmanager_payload(a, t)
            )
            r.raise_for_status()
        if t.webhook_url and webhook:
            r = await self.client.post(t.webhook_url, json=webhook_payload(a, t))
            r.raise_for_status()

    async def deliver_due(self, limit: int = 100) -> int:
        """Deliver what is due and not claimed by another dispatcher; returns the number of
        events delivered."""
        if not self.targets.any:
            return 0
        rows = await self.pool.fetch(
            _DUE, self.diagnosis_wait, limit, self.name, self.claim_seconds
        )
        delivered = 0
        for rec in rows:
            if await self._deliver(dict(rec)):
                delivered += 1
        if self.targets.alertmanager_url:
            await self._resend(limit)
        return delivered

    async def _still_mine(self, alert_id: int) -> bool:
        """Right before a send: the claim has not run out (extended for this send)."""
        got = await self.pool.fetchval(_RECLAIM, alert_id, self.name, self.claim_seconds)
        return got is not None

    async def _deliver(self, a: dict[str, Any]) -> bool:
        """Send one claimed alert's due event(s); record the outcome under the claim."""
        mine = "claimed_by = $2"
        try:
            if a["status"] == "resolved" and not a["delivered_firing"]:
                # resolved before its firing went out: receivers still get the firing first
                if not await self._still_mine(a["id"]):
                    return False
                await self._send({**a, "status": "firing", "resolved_at": None})
                await self.pool.execute(
                    f"UPDATE alerts SET delivered_firing = true WHERE id = $1 AND {mine}",  # noqa: S608
                    a["id"],
                    self.name,
                )
                a["delivered_firing"] = True
            if not await self._still_mine(a["id"]):
                return False
            await self._send(a)
        except (httpx.HTTPError, OSError) as exc:
            metrics.ALERT_DELIVERIES.labels(_FAILED_DELIVERY).inc()
            await self.pool.execute(
                "UPDATE alerts SET attempts = attempts + 1, last_error = $3, next_attempt_at = "
                "now() + make_interval(secs => least(300, power(2, attempts))), "
                "claimed_by = NULL, claimed_until = NULL WHERE id = $1 AND claimed_by = $2",
                a["id"],
                self.name,
                redact(str(exc), (self.targets.alertmanager_url, self.targets.webhook_url))[:500],
            )
            return False
        except BaseException:
            await self._release(a["id"])
            raise
        metrics.ALERT_DELIVERIES.labels(_DELIVERED).inc()
        done = "claimed_by = NULL, claimed_until = NULL, last_error = NULL, last_sent_at = now()"
        if a["status"] == "resolved":
            sql = (
                f"UPDATE alerts SET delivered_firing = true, delivered_resolved = true, {done} "  # noqa: S608
                f"WHERE id = $1 AND {mine} AND status = 'resolved'"
            )
        else:
            sql = f"UPDATE alerts SET delivered_firing = true, {done} WHERE id = $1 AND {mine}"  # noqa: S608
        # no row: the claim ran out during the send and another dispatcher owns the alert now
        await self.pool.execute(sql, a["id"], self.name)
        return True

    async def _release(self, alert_id: int) -> None:
        try:
            await self.pool.execute(_CLEAR, alert_id, self.name)
        except Exception as exc:  # the claim runs out by itself
            log.warning("alert %s claim not released: %s", alert_id, exc)

    async def _resend(self, limit: int) -> None:
        """Keep firing alerts alive in Alertmanager (errors: tried again next pass)."""
        for rec in await self.pool.fetch(_RESEND, self.resend_interval, limit):
            a = dict(rec)
            a["trace_id"] = await self.pool.fetchval(
                "SELECT trace_id FROM spans WHERE correlation_id = $1 ORDER BY start_time LIMIT 1",
                a["correlation_id"],
            )
            try:
                await self._send(a, webhook=False)
            except (httpx.HTTPError, OSError):  # sent again at the next resend interval
                metrics.ALERT_DELIVERIES.labels(_FAILED_DELIVERY).inc()
                continue
            metrics.ALERT_DELIVERIES.labels(_DELIVERED).inc()

    async def run(self) -> None:
        while True:
            try:
                if self.is_leader():
                    await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alert delivery pass failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def aclose(self) -> None:
        await self.client.aclose()
