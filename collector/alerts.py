"""Alert delivery from the ``alerts`` table (outbox): Alertmanager v2 API and/or a plain webhook
in Alertmanager's webhook JSON (version 4). Undelivered events are retried with exponential
backoff (1s .. 5min), so a receiver that is down loses no alert. Run by the scan leader only.
Firing alerts are re-sent to Alertmanager every ``resend_interval`` (as Prometheus does), else
Alertmanager would resolve them after its ``resolve_timeout``; the webhook gets each event once.

Two kinds of alert (``alerts.kind``): a stalled correlation (``HoptraceStalledCorrelation``) and a
failed one, whose step errored for good, e.g. was dead-lettered (``HoptraceFailedCorrelation``).

Alerts are labelled to route like Prometheus alerts: ``alertname``, ``severity``, ``pipeline``,
``step`` (the step not done, or the one that failed), ``cause`` (the diagnosis' cause code;
``missing_evidence`` when the diagnosis gave none in time), ``service`` (the step's, from the
spec) and ``correlation_id``. ``severity`` is ``critical`` for a failed correlation and for a
cause that does not clear by itself (:data:`CRITICAL_CAUSES`: someone must repair the payment),
``warning`` otherwise (a stalled payment that moves on once its worker, consumer or downstream is
back). An alert's labels are fixed when it is first sent (``alerts.labels``): Alertmanager knows
an alert by its labels, so its re-sends and its resolution carry the same ones.

Deliveries are batched per group (``pipeline``, ``step``, ``cause``, :data:`GROUP_BY`), the way
Alertmanager groups them: each delivery pass (every ``interval``, up to 500 alerts) sends the
webhook one request per group listing that group's due alerts (``groupLabels``, ``commonLabels``,
``groupKey`` as Alertmanager writes them) and Alertmanager one ``POST /api/v2/alerts`` per group.
The payments that stall together (one scan; their causes are recorded together, see
:mod:`.stalls`) go out in one request; grouping over minutes is Alertmanager's job
(``group_wait``, ``group_interval``: ``deploy/alertmanager/route-example.yml``).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson

from hoptrace.contract import CAUSES, Cause, Outcome, State

from . import metrics
from .lease import holder_id

#: ``hoptrace_alert_deliveries{result=...}``: a delivery's outcome, in the words of a step's.
_DELIVERED, _FAILED_DELIVERY = Outcome.OK.value, Outcome.ERROR.value

log = logging.getLogger("hoptrace.collector.alerts")

ALERTNAME = "HoptraceStalledCorrelation"
ALERTNAME_FAILED = "HoptraceFailedCorrelation"
CRITICAL, WARNING = "critical", "warning"
#: Causes that do not clear by themselves: the event was marked processed without its row, never
#: emitted, consumed outside any trace, or has no topic to go to. Someone must act on each payment.
CRITICAL_CAUSES = frozenset(
    c.value
    for c in (
        Cause.MARKED_WITHOUT_EFFECT,
        Cause.NOT_EMITTED,
        Cause.CONSUMED_WITHOUT_TRACE,
        Cause.TOPIC_MISSING,
    )
)
#: The labels a delivery batch shares (Alertmanager's ``group_by`` in the route example).
GROUP_BY = ("pipeline", "step", "cause")
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
#: The label sets of claimed alerts sent for the first time ($1 ids, $2 labels as JSON text).
_FREEZE = """
UPDATE alerts a SET labels = u.labels::jsonb
FROM unnest($1::bigint[], $2::text[]) AS u(id, labels)
WHERE a.id = u.id AND a.claimed_by = $3 AND a.labels IS NULL
"""
#: Which are still ours? Extends their claims; an alert whose claim ran out (another dispatcher
#: may own it now) is not returned.
_RECLAIM = """
UPDATE alerts SET claimed_until = clock_timestamp() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND claimed_by = $2 AND claimed_until > clock_timestamp()
RETURNING id
"""
_CLEAR = (
    "UPDATE alerts SET claimed_by = NULL, claimed_until = NULL "
    "WHERE id = ANY($1::bigint[]) AND claimed_by = $2"
)
_SENT_FIRST = (
    "UPDATE alerts SET delivered_firing = true WHERE id = ANY($1::bigint[]) AND claimed_by = $2"
)
_SENT_RESOLVED = """
UPDATE alerts SET delivered_firing = true, delivered_resolved = true, claimed_by = NULL,
    claimed_until = NULL, last_error = NULL, last_sent_at = now()
WHERE id = ANY($1::bigint[]) AND claimed_by = $2 AND status = 'resolved'
"""
_SENT_FIRING = """
UPDATE alerts SET delivered_firing = true, claimed_by = NULL, claimed_until = NULL,
    last_error = NULL, last_sent_at = now()
WHERE id = ANY($1::bigint[]) AND claimed_by = $2
"""
_FAILED_SEND = """
UPDATE alerts SET attempts = attempts + 1, last_error = $3,
    next_attempt_at = now() + make_interval(secs => least(300, power(2, attempts))),
    claimed_by = NULL, claimed_until = NULL
WHERE id = ANY($1::bigint[]) AND claimed_by = $2
"""
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
RETURNING a.*
"""
_TRACE_IDS = """
SELECT DISTINCT ON (correlation_id) correlation_id, trace_id FROM spans
WHERE correlation_id = ANY($1::text[]) ORDER BY correlation_id, start_time
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


def severity_for(kind: str | None, cause: str | None) -> str:
    """``critical`` for a failed correlation or a cause that does not clear by itself, else
    ``warning``."""
    return CRITICAL if kind == _FAILED or cause in CRITICAL_CAUSES else WARNING


def alert_labels(a: dict[str, Any]) -> dict[str, str]:
    """The alert's labels: the ones it was first sent with (``a["labels"]``), else from the row
    now (a label with no value is left out, as Prometheus does). An alert first sent by an older
    collector, which kept no labels, keeps the ones it had then."""
    frozen = a.get("labels")
    if frozen:
        got = orjson.loads(frozen) if isinstance(frozen, str | bytes) else frozen
        return {str(k): str(v) for k, v in got.items()}
    failed = a.get("kind") == _FAILED
    if a.get("delivered_firing"):  # sent before labels were kept: the labels of that time
        return {
            "alertname": ALERTNAME_FAILED if failed else ALERTNAME,
            "pipeline": a.get("pipeline") or "",
            "step": a.get("step") or "",
            "correlation_id": a["correlation_id"],
        }
    cause = a.get("cause") or Cause.MISSING_EVIDENCE.value
    labels = {
        "alertname": ALERTNAME_FAILED if failed else ALERTNAME,
        "severity": severity_for(a.get("kind"), cause),
        "pipeline": a.get("pipeline") or "",
        "step": a.get("step") or "",
        "cause": cause,
        "service": a.get("service") or "",
        "correlation_id": a["correlation_id"],
    }
    return {k: v for k, v in labels.items() if v}


def group_of(labels: dict[str, str]) -> tuple[str, ...]:
    """The delivery group of an alert with ``labels`` (its :data:`GROUP_BY` values)."""
    return tuple(labels.get(k, "") for k in GROUP_BY)


def alert_body(a: dict[str, Any], t: Targets) -> dict[str, Any]:
    """One alert in Alertmanager's model (labels, annotations, startsAt, endsAt, generatorURL)."""
    labels = alert_labels(a)
    failed = a.get("kind") == _FAILED
    cause = labels.get("cause", "")
    dash = f"{t.dashboard_url.rstrip('/')}/?id={a['correlation_id']}"
    annotations = {
        "summary": f"correlation {a['correlation_id']} failed at step {a.get('step')}"
        if failed
        else f"correlation {a['correlation_id']} stalled before step {a.get('step')}",
        "description": Cause(cause).meaning if cause in CAUSES else "",
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


def alertmanager_payload(alerts: Iterable[dict[str, Any]], t: Targets) -> list[dict[str, Any]]:
    """Body for ``POST /api/v2/alerts`` (postableAlerts)."""
    out = []
    for a in alerts:
        body = alert_body(a, t)
        one = {k: body[k] for k in ("labels", "annotations", "startsAt", "generatorURL")}
        if body["status"] == "resolved":
            one["endsAt"] = body["endsAt"]
        out.append(one)
    return out


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    """The key/value pairs every map has."""
    common = dict(maps[0]) if maps else {}
    for m in maps[1:]:
        common = {k: v for k, v in common.items() if m.get(k) == v}
    return common


def webhook_payload(alerts: list[dict[str, Any]], t: Targets) -> dict[str, Any]:
    """Alertmanager's webhook JSON (version 4) for one group's alerts (one :data:`GROUP_BY`)."""
    bodies = [alert_body(a, t) for a in alerts]
    group = {k: v for k, v in zip(GROUP_BY, group_of(bodies[0]["labels"]), strict=True) if v}
    key = ", ".join(f'{k}="{v}"' for k, v in sorted(group.items()))
    firing = any(b["status"] == "firing" for b in bodies)
    return {
        "version": "4",
        "groupKey": f"{{}}:{{{key}}}",
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": "hoptrace",
        "groupLabels": group,
        "commonLabels": _common([b["labels"] for b in bodies]),
        "commonAnnotations": _common([b["annotations"] for b in bodies]),
        "externalURL": t.dashboard_url,
        "alerts": bodies,
    }


def _groups(alerts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``alerts`` split by delivery group, each group in the order given."""
    out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for a in alerts:
        out.setdefault(group_of(alert_labels(a)), []).append(a)
    return list(out.values())


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
        #: long enough for the sends of one group (up to three requests of ``timeout``)
        self.claim_seconds = claim_seconds if claim_seconds is not None else 4 * timeout + 10
        self.name = holder_id()
        self.pool = pool
        self.targets = targets
        self.is_leader = is_leader
        self.interval = interval
        self.diagnosis_wait = diagnosis_wait
        self.client = httpx.AsyncClient(timeout=timeout)

    async def _send(self, alerts: list[dict[str, Any]], webhook: bool = True) -> None:
        """One group's alerts: one request to each target."""
        t = self.targets
        if t.alertmanager_url:
            r = await self.client.post(
                f"{t.alertmanager_url.rstrip('/')}/api/v2/alerts",
                json=alertmanager_payload(alerts, t),
            )
            r.raise_for_status()
        if t.webhook_url and webhook:
            r = await self.client.post(t.webhook_url, json=webhook_payload(alerts, t))
            r.raise_for_status()

    async def deliver_due(self, limit: int = 500) -> int:
        """Deliver what is due and not claimed by another dispatcher, one request per group and
        target; returns the number of alerts whose event(s) were delivered."""
        if not self.targets.any:
            return 0
        rows = [
            dict(r)
            for r in await self.pool.fetch(
                _DUE, self.diagnosis_wait, limit, self.name, self.claim_seconds
            )
        ]
        delivered = 0
        if rows:
            await self._freeze_labels(rows)
            for group in _groups(rows):
                delivered += await self._deliver(group)
        if self.targets.alertmanager_url:
            await self._resend(limit)
        return delivered

    async def _freeze_labels(self, rows: list[dict[str, Any]]) -> None:
        """Fix the labels of the claimed alerts sent for the first time (kept for every later
        send of them)."""
        new = [a for a in rows if not a.get("labels")]
        for a in new:
            a["labels"] = alert_labels(a)
        if new:
            await self.pool.execute(
                _FREEZE,
                [a["id"] for a in new],
                [orjson.dumps(a["labels"]).decode() for a in new],
                self.name,
            )

    async def _still_mine(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Right before a send: the alerts whose claim has not run out (extended for the send)."""
        ids = [a["id"] for a in alerts]
        got = {r["id"] for r in await self.pool.fetch(_RECLAIM, ids, self.name, self.claim_seconds)}
        return [a for a in alerts if a["id"] in got]

    async def _deliver(self, group: list[dict[str, Any]]) -> int:
        """Send one group's claimed alerts (their due events); record the outcome under the
        claim. Returns how many were delivered."""
        ids = [a["id"] for a in group]
        try:
            early = [a for a in group if a["status"] == "resolved" and not a["delivered_firing"]]
            if early:
                # resolved before their firing went out: receivers still get the firing first
                early = await self._still_mine(early)
                if early:
                    await self._send(
                        [{**a, "status": "firing", "resolved_at": None} for a in early]
                    )
                    await self.pool.execute(_SENT_FIRST, [a["id"] for a in early], self.name)
                    for a in early:
                        a["delivered_firing"] = True
            group = await self._still_mine(group)
            if not group:
                return 0
            await self._send(group)
        except (httpx.HTTPError, OSError) as exc:
            metrics.ALERT_DELIVERIES.labels(_FAILED_DELIVERY).inc(len(group))
            error = redact(str(exc), (self.targets.alertmanager_url, self.targets.webhook_url))
            await self.pool.execute(_FAILED_SEND, ids, self.name, error[:500])
            return 0
        except BaseException:
            await self._release(ids)
            raise
        metrics.ALERT_DELIVERIES.labels(_DELIVERED).inc(len(group))
        resolved = [a["id"] for a in group if a["status"] == "resolved"]
        firing = [a["id"] for a in group if a["status"] != "resolved"]
        # an alert missing here: its claim ran out during the send and another dispatcher owns it
        if resolved:
            await self.pool.execute(_SENT_RESOLVED, resolved, self.name)
        if firing:
            await self.pool.execute(_SENT_FIRING, firing, self.name)
        return len(group)

    async def _release(self, ids: list[int]) -> None:
        try:
            await self.pool.execute(_CLEAR, ids, self.name)
        except Exception as exc:  # the claims run out by themselves
            log.warning("alert claims %s not released: %s", ids, exc)

    async def _resend(self, limit: int) -> None:
        """Keep firing alerts alive in Alertmanager (errors: tried again next pass)."""
        rows = [dict(r) for r in await self.pool.fetch(_RESEND, self.resend_interval, limit)]
        if not rows:
            return
        traces = dict(await self.pool.fetch(_TRACE_IDS, list({a["correlation_id"] for a in rows})))
        for a in rows:
            a["trace_id"] = traces.get(a["correlation_id"])
        for group in _groups(rows):
            try:
                await self._send(group, webhook=False)
            except (httpx.HTTPError, OSError):  # sent again at the next resend interval
                metrics.ALERT_DELIVERIES.labels(_FAILED_DELIVERY).inc(len(group))
                continue
            metrics.ALERT_DELIVERIES.labels(_DELIVERED).inc(len(group))

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
