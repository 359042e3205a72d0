"""The read API on the real collector (in-process, real PostgreSQL and Kafka): every route in the
OpenAPI document and every answer matching it, the token, list filters and keyset pages, and the
CLI printing the same through the API as through the database."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from starlette.routing import Route

from hoptrace.collector import api_openapi
from hoptrace.collector.decode import decode_request
from hoptrace.collector.writer import Writer, init_connection
from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT

from ..dashboard.seed import Payments, Seeded, seed
from ..support import create_topics, delete_topics
from .conftest import MakeCollector

pytestmark = pytest.mark.stack

TOKEN = "api-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TRACE_SCHEMA = json.loads((PROJECT_ROOT / "docs" / "trace-json-schema.json").read_text())
HOPTRACE = Path(os.environ.get("VIRTUAL_ENV", PROJECT_ROOT / ".venv")) / "bin" / "hoptrace"


@dataclass
class Served:
    url: str
    seeded: Seeded
    collector: Any
    env: dict[str, str]


@pytest.fixture
def topics(kafka_bootstrap: str, spec_path: Path) -> Iterator[list[str]]:
    names = sorted(load_spec(spec_path).topics)
    asyncio.run(create_topics(kafka_bootstrap, names))
    yield names
    asyncio.run(delete_topics(kafka_bootstrap, names))


@pytest.fixture
async def served(
    hoptrace_env: dict[str, str],
    db_url: str,
    spec_path: Path,
    topics: list[str],
    make_collector: MakeCollector,
) -> AsyncIterator[Served]:
    seeded = await seed(db_url, load_spec(spec_path))
    collector = await make_collector(ingest_token=TOKEN)
    yield Served(f"http://127.0.0.1:{collector.http_port}", seeded, collector, hoptrace_env)


async def get(served: Served, path: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=served.url, headers=AUTH, trust_env=False) as c:
        return await c.get(f"/api/v1{path}", params=params, timeout=30)


def check(doc: dict[str, Any], schema_name: str, value: Any) -> None:
    """``value`` against a component schema of the OpenAPI document."""
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    jsonschema.Draft202012Validator(root).validate(value)


async def test_every_route_is_documented_and_every_answer_matches(served: Served) -> None:
    doc = (await get(served, "/openapi.json")).json()
    jsonschema.Draft202012Validator.check_schema({"$defs": doc["components"]["schemas"]})
    app = served.collector._http.config.app
    api_paths = {r.path for r in app.routes if isinstance(r, Route) and r.path.startswith("/api")}
    assert api_paths == set(doc["paths"]), "routes and the OpenAPI document differ"
    cid = served.seeded.stalled[0]

    trace = (await get(served, f"/correlations/{cid}")).json()
    jsonschema.validate(trace, TRACE_SCHEMA)
    check(doc, "Trace", trace)
    assert trace["stopped_at"] == "trainer.allocated" and trace["cause"] == "no_consumer"
    with_spans = (await get(served, f"/correlations/{cid}", spans="true")).json()
    jsonschema.validate(with_spans, TRACE_SCHEMA)
    check(doc, "Trace", with_spans)
    assert {s["step"] for s in with_spans["spans"]} == {"payment.confirmed", "purchase.created"}

    page = (await get(served, "/correlations")).json()
    check(doc, "CorrelationPage", page)
    stalls = (await get(served, "/stalls")).json()
    check(doc, "CorrelationPage", {"items": [], "next_cursor": None})
    jsonschema.Draft202012Validator(
        {
            "type": "array",
            "items": {"$ref": "#/components/schemas/Stall"},
            **{"components": doc["components"]},
        }
    ).validate(stalls)
    pipeline = (await get(served, "/pipeline")).json()
    check(doc, "Pipeline", pipeline)
    assert [s["id"] for s in pipeline["steps"]][2] == "trainer.allocated"
    overview = (await get(served, "/overview", since="1h", samples="true")).json()
    check(doc, "Overview", overview)
    assert overview["stalled_counts"] == {"trainer.allocated": len(served.seeded.stalled)}
    alerts = (await get(served, "/alerts")).json()
    for a in alerts:
        check(doc, "Alert", a)
    assert {a["correlation_id"] for a in alerts} >= set(served.seeded.stalled)
    for status in ("400", "401"):  # errors carry a Problem
        assert doc["paths"]["/api/v1/correlations"]["get"]["responses"][status]
    bad = await get(served, "/correlations", state="nope")
    assert bad.status_code == 400
    check(doc, "Problem", bad.json())


async def test_the_ingest_token_guards_every_route_but_the_document(served: Served) -> None:
    doc = api_openapi.document()
    async with httpx.AsyncClient(base_url=served.url, trust_env=False) as c:
        for path in doc["paths"]:
            url = path.replace("{correlation_id}", served.seeded.stalled[0])
            plain = await c.get(url)
            wrong = await c.get(url, headers={"Authorization": "Bearer nope"})
            if path.endswith("openapi.json"):
                assert plain.status_code == 200
                continue
            assert (plain.status_code, wrong.status_code) == (401, 401), path
            assert plain.headers["www-authenticate"] == "Bearer"
            assert (await c.get(url, headers=AUTH)).status_code == 200, path


async def ids(served: Served, **params: Any) -> list[str]:
    resp = await get(served, "/correlations", **params)
    assert resp.status_code == 200, resp.text
    return [r["correlation_id"] for r in resp.json()["items"]]


async def test_filters_by_state_step_service_cause_and_time(served: Served) -> None:
    s = served.seeded
    assert sorted(await ids(served, state="stalled")) == sorted(s.stalled)
    assert sorted(await ids(served, state="stalled,failed")) == sorted(s.stalled + s.failed)
    # where it is: the step it waits on (stalled) or failed at
    at_allocation = sorted(s.stalled + s.failed)
    assert sorted(await ids(served, step="trainer.allocated")) == at_allocation
    assert sorted(await ids(served, service="allocation-worker")) == at_allocation
    assert await ids(served, service="allocation-worker", step="purchase.created") == []
    # the cause the stall scan's diagnosis gave the latest alert; the recovered payment's alert
    # said no_consumer too, before it completed
    assert sorted(await ids(served, cause="no_consumer")) == sorted(s.stalled + s.recovered)
    rows = (await get(served, "/correlations", state="stalled")).json()["items"]
    assert {(r["step"], r["service"], r["cause"]) for r in rows} == {
        ("trainer.allocated", "allocation-worker", "no_consumer")
    }
    everyone = s.completed + s.stalled + s.failed + s.in_progress
    assert sorted(await ids(served, limit=500)) == sorted(everyone)
    # the seed's payments started 1 s to 10+ minutes ago: since/until split them
    recent = await ids(served, since="2m")
    assert recent == s.in_progress
    older = await ids(served, until=(datetime.now(UTC) - timedelta(minutes=2)).isoformat())
    assert sorted(recent + older) == sorted(everyone)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"state": "nope"}, "unknown state 'nope': use one of completed, in_progress"),
        ({"step": "x.y"}, "unknown step 'x.y'"),
        ({"service": "ghost"}, "unknown service 'ghost'"),
        ({"cause": "gremlins"}, "unknown cause 'gremlins'"),
        ({"limit": "0"}, "bad limit 0: use a whole number from 1 to 500"),
        ({"limit": "501"}, "bad limit 501"),
        ({"limit": "ten"}, "bad limit 'ten'"),
        ({"since": "yesterday"}, "bad since 'yesterday': use an ISO 8601 time"),
        ({"since": "1h", "until": "2h"}, "must be before until"),
        ({"cursor": "garbage!"}, "bad cursor"),
        ({"sate": "stalled"}, "unknown parameter sate: the filters are state, step"),
    ],
)
async def test_bad_filters_get_a_clear_400(
    served: Served, params: dict[str, str], says: str
) -> None:
    resp = await get(served, "/correlations", **params)
    assert resp.status_code == 400 and says in resp.json()["detail"], resp.text


async def test_pages_are_newest_first_and_stable_under_inserts(
    served: Served, db_url: str, spec_path: Path
) -> None:
    first = (await get(served, "/correlations", limit=3)).json()
    seen = [r["correlation_id"] for r in first["items"]]
    times = [r["first_seen"] for r in first["items"]]
    # a payment arrives between two pages: it is newer than every page, so no page shifts
    spec = load_spec(spec_path)
    build = Payments(spec)
    build.payment("pay-new-000", datetime.now(UTC), done=1)
    import asyncpg

    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2, init=init_connection)
    try:
        await Writer(pool, spec, timedelta(days=7)).write(
            decode_request(build.req, datetime.now(UTC)).rows
        )
    finally:
        await pool.close()
    cursor = first["next_cursor"]
    while cursor:
        page = (await get(served, "/correlations", limit=3, cursor=cursor)).json()
        seen += [r["correlation_id"] for r in page["items"]]
        times += [r["first_seen"] for r in page["items"]]
        cursor = page["next_cursor"]
    s = served.seeded
    assert sorted(seen) == sorted(s.completed + s.stalled + s.failed + s.in_progress)
    assert len(seen) == len(set(seen))
    parsed = [datetime.fromisoformat(t) for t in times]
    assert parsed == sorted(parsed, reverse=True)
    assert (await ids(served, limit=1)) == ["pay-new-000"]


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    exe = str(HOPTRACE) if HOPTRACE.exists() else "hoptrace"
    proc = await asyncio.create_subprocess_exec(
        exe, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def through_api(served: Served, token: str = TOKEN) -> dict[str, str]:
    """The CLI's environment with the API and no usable database or Kafka."""
    return {
        **served.env,
        "HOPTRACE_API_URL": served.url,
        "HOPTRACE_API_TOKEN": token,
        "HOPTRACE_DATABASE_URL": "postgresql://nobody:wrong@127.0.0.1:1/none",
        "HOPTRACE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    }


def stable(doc: dict[str, Any]) -> dict[str, Any]:
    """A trace document without what changes between two lookups (time and timing)."""
    return {k: v for k, v in doc.items() if k not in ("checked_at", "gathered_in_ms")}


async def test_the_cli_prints_the_same_through_the_api(served: Served) -> None:
    env = {k: v for k, v in served.env.items() if not k.startswith("HOPTRACE_API_")}
    api_env = through_api(served)
    # stalls first: the in-progress payment becomes overdue (and stalled) within a minute
    code, out_db, _ = await run_cli(env, "stalls", "--json")
    code_api, out_api, err = await run_cli(api_env, "stalls", "--json")
    assert (code, code_api) == (0, 0), err

    def without_clock(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "overdue_by_seconds"} for r in rows]

    assert without_clock(json.loads(out_api)) == without_clock(json.loads(out_db))
    stuck = served.seeded.stalled + served.seeded.failed
    assert {r["correlation_id"] for r in json.loads(out_api)} >= set(stuck)

    for cid in (served.seeded.stalled[0], served.seeded.failed[0], served.seeded.completed[0]):
        code_db, out_db, err_db = await run_cli(env, "trace", cid, "--format", "json")
        code_api, out_api, err_api = await run_cli(api_env, "trace", cid, "--format", "json")
        assert (code_db, code_api) == (0, 0), err_db + err_api
        jsonschema.validate(json.loads(out_api), TRACE_SCHEMA)
        assert stable(json.loads(out_api)) == stable(json.loads(out_db))
        _, text_db, _ = await run_cli(env, "trace", cid)
        _, text_api, _ = await run_cli(api_env, "trace", cid)
        assert text_api == text_db and cid in text_api


async def test_the_cli_through_the_api_keeps_its_exit_codes(served: Served) -> None:
    api_env = through_api(served)
    code, _, err = await run_cli(api_env, "trace", "pay-never-seen")
    assert code == 2 and "no payment with id 'pay-never-seen' is known" in err
    code, _, err = await run_cli(through_api(served, token="wrong"), "trace", "pay-stall-000")
    assert code == 1 and "missing or invalid bearer token" in err
    code, _, err = await run_cli(through_api(served, token="wrong"), "stalls")
    assert code == 1 and "missing or invalid bearer token" in err
    gone = {**api_env, "HOPTRACE_API_URL": "http://127.0.0.1:1"}
    code, _, err = await run_cli(gone, "trace", "pay-stall-000")
    assert code == 1 and "did not answer" in err
