"""Alert delivery from the ``alerts`` table (outbox): Alertmanager v2 API and/or a plain webhook
in Alertmanager's webhook JSON (version 4). Undelivered events are retried with exponential
backoff (1s .. 5min), so a receiver that is down loses no alert. Run by the scan leader only.
Firing alerts are re-sent to Alertmanager every ``resend_interval`` (as Prometheus does), else
Alertmanager would resolve them after its ``resolve_timeout``; the webhook gets each event once.

Firing alerts wait for their diagnosis (``diagnosed``) for at most ``diagnosis_wait`` seconds.
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

from hoptrace.contract import Outcome

from . import metrics

#: ``hoptrace_alert_deliveries{result=...}``: a delivery's outcome, in the words of a step's.
_DELIVERED, _FAILED = Outcome.OK.value, Outcome.ERROR.value

log = logging.getLogger("hoptrace.collector.alerts")

ALERTNAME = "HoptraceStalledCorrelation"
_ZERO_TIME = "0001-01-01T00:00:00Z"

_DUE = """
SELECT a.*, (SELECT s.trace_id FROM spans s WHERE s.correlation_id = a.correlation_id
             ORDER BY s.start_time LIMIT 1) AS trace_id
FROM alerts a
WHERE (NOT a.delivered_firing OR (a.status = 'resolved' AND NOT a.delivered_resolved))
  AND a.next_attempt_at <= now()
  AND (a.diagnosed OR a.status = 'resolved' OR a.fired_at < now() - make_interval(secs => $1))
ORDER BY a.next_attempt_at LIMIT $2
"""
_RESEND = """
SELECT a.*, NULL::text AS trace_id FROM alerts a
WHERE a.status = 'firing' AND a.delivered_firing
  AND a.last_sent_at < now() - make_interval(secs => $1)
ORDER BY a.last_sent_at LIMIT $2
"""


@dataclass(frozen=True, slots=True)
class Targets:
    alertmanager_url: str | None
    webhook_url: str | None
    dashboard_url: str
    jaeger_url: str

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
    labels = {
        "alertname": ALERTNAME,
        "pipeline": a.get("pipeline") or "",
        "step": a.get("step") or "",
        "correlation_id": a["correlation_id"],
    }
    dash = f"{t.dashboard_url.rstrip('/')}/?id={a['correlation_id']}"
    annotations = {
        "summary": f"correlation {a['correlation_id']} stalled before step {a.get('step')}",
        "cause": a.get("cause") or "",
        "evidence": a.get("evidence") or "",
        "dashboard_url": dash,
        "jaeger_url": f"{t.jaeger_url.rstrip('/')}/trace/{a['trace_id']}"
        if a.get("trace_id")
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
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{ALERTNAME}", correlation_id="{a["correlation_id"]}"}}',
        "truncatedAlerts": 0,
        "status": body["status"],
        "receiver": "hoptrace",
        "groupLabels": {"alertname": ALERTNAME, "correlation_id": a["correlation_id"]},
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
    ) -> None:
        self.resend_interval = resend_interval
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
        """Deliver what is due; returns the number of events delivered."""
        if not self.targets.any:
            return 0
        rows = await self.pool.fetch(_DUE, self.diagnosis_wait, limit)
        delivered = 0
        for rec in rows:
            a = dict(rec)
            try:
                if a["status"] == "resolved" and not a["delivered_firing"]:
                    # resolved before its firing went out: receivers still get the firing first
                    await self._send({**a, "status": "firing", "resolved_at": None})
                    await self.pool.execute(
                        "UPDATE alerts SET delivered_firing = true WHERE id = $1", a["id"]
                    )
                    a["delivered_firing"] = True
                await self._send(a)
            except (httpx.HTTPError, OSError) as exc:
                metrics.ALERT_DELIVERIES.labels(_FAILED).inc()
                await self.pool.execute(
                    "UPDATE alerts SET attempts = attempts + 1, last_error = $2, next_attempt_at = "
                    "now() + make_interval(secs => least(300, power(2, attempts))) WHERE id = $1",
                    a["id"],
                    redact(str(exc), (self.targets.alertmanager_url, self.targets.webhook_url))[
                        :500
                    ],
                )
                continue
            metrics.ALERT_DELIVERIES.labels(_DELIVERED).inc()
            delivered += 1
            if a["status"] == "resolved":
                sql = (
                    "UPDATE alerts SET delivered_firing = true, delivered_resolved = true, "
                    "last_error = NULL, last_sent_at = now() WHERE id = $1 AND status = 'resolved'"
                )
            else:
                sql = (
                    "UPDATE alerts SET delivered_firing = true, last_error = NULL, "
                    "last_sent_at = now() WHERE id = $1"
                )
            await self.pool.execute(sql, a["id"])
        if self.targets.alertmanager_url:
            await self._resend(limit)
        return delivered

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
            except (httpx.HTTPError, OSError):
                metrics.ALERT_DELIVERIES.labels(_FAILED).inc()
                continue
            metrics.ALERT_DELIVERIES.labels(_DELIVERED).inc()
            await self.pool.execute(
                "UPDATE alerts SET last_sent_at = now() WHERE id = $1 AND status = 'firing'",
                a["id"],
            )

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
