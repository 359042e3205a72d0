"""The spec's per-step ``outbox`` (loaded, validated, in ``to_dict``), and the collector's redrive
route: mounted only with a redrive token, refusing a missing or wrong token and bad bodies before
anything is read."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette

from hoptrace.contract import SpecError, load_spec, parse_spec
from hoptrace.contract.spec import OutboxTable
from hoptrace.repair.http import PATH, routes
from tests.support import REFERENCE_SPEC


def _spec(outbox: object, emits: bool = True) -> dict:
    first = {"id": "a", "service": "a-svc", "deadline": "5s", "outbox": outbox}
    if emits:
        first["emits"] = "t"
    return {"pipeline": {"name": "p"}, "steps": [first]}


def test_the_reference_spec_names_payment_service_s_outbox() -> None:
    spec = load_spec(REFERENCE_SPEC)
    assert spec.steps[0].outbox == OutboxTable("payment_outbox", "correlation_id", "event")
    assert spec.to_dict()["steps"][0]["outbox"]["table"] == "payment_outbox"
    assert spec.to_dict()["steps"][1]["outbox"] is None


def test_outbox_defaults_and_errors() -> None:
    spec = parse_spec(_spec({"table": "my.outbox"}))
    assert spec.steps[0].outbox == OutboxTable("my.outbox", "correlation_id", "event")
    with pytest.raises(SpecError, match="field 'outbox': needs a 'table'"):
        parse_spec(_spec({"event_column": "e"}))
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['colour'\]"):
        parse_spec(_spec({"table": "o", "colour": "x"}))
    with pytest.raises(SpecError, match="not a table or column name"):
        parse_spec(_spec({"table": "o; DROP TABLE x"}))
    with pytest.raises(SpecError, match="needs 'emits'"):
        parse_spec(_spec({"table": "o"}, emits=False))


def client(token: str) -> httpx.AsyncClient:
    app = Starlette(routes=routes(token))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collector")


async def test_no_token_no_route() -> None:
    assert routes("") == []
    async with client("") as c:
        assert (await c.post(PATH, json={"id": "x"})).status_code == 404


async def test_the_route_refuses_a_missing_or_wrong_token_and_bad_bodies() -> None:
    async with client("s3cret") as c:
        assert (await c.post(PATH, json={"id": "x"})).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await c.post(PATH, json={"id": "x"}, headers=wrong)).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert (await c.post(PATH, content=b"{", headers=ok)).status_code == 400
        assert (await c.post(PATH, json=["x"], headers=ok)).status_code == 400
        bad_apply = {"id": "x", "apply": "yes"}
        assert (await c.post(PATH, json=bad_apply, headers=ok)).status_code == 400
        bad = await c.post(PATH, json={"id": "DROP TABLE"}, headers=ok)
        assert bad.status_code == 400 and "correlation id" in bad.json()["message"]
