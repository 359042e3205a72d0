"""Rendering: every cause of the unit table renders as text, markdown and schema-valid JSON."""

from __future__ import annotations

import json

import jsonschema
import pytest

from hoptrace.collector.diagnosis import diagnose
from hoptrace.collector.render import render, to_dict
from hoptrace.settings import PROJECT_ROOT

from .test_diagnosis_unit import CASES, SPEC

SCHEMA = json.loads((PROJECT_ROOT / "docs" / "trace-json-schema.json").read_text())


@pytest.mark.parametrize(("ev", "now"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_every_cause_renders(ev, now) -> None:
    d = diagnose(SPEC, ev, now)
    doc = json.loads(render(d, "json", "http://jaeger:16686/"))
    jsonschema.validate(doc, SCHEMA)
    assert (doc["stopped_at"], doc["cause"]) == (d.stopped_at, d.cause)
    assert [s["id"] for s in doc["steps"]] == [s.id for s in SPEC.steps]
    assert all(u.startswith("http://jaeger:16686/trace/") for u in doc["jaeger_urls"])
    text = render(d, "text")
    assert f"cause: {d.cause}" in text
    if d.stopped_at:
        assert "▶ " in text and d.stopped_at in text.split("▶", 1)[1].splitlines()[0]
    md = render(d, "markdown", "http://jaeger:16686")
    assert md.startswith(f"## Payment `{d.correlation_id}`")
    assert (
        "### Steps" in md
        and "### processed_events" in md
        and "### Queries run" not in md
        or d.queries
    )


def test_json_without_jaeger_url_has_no_links() -> None:
    d = diagnose(SPEC, CASES[0][1], CASES[0][2])
    assert to_dict(d, None)["jaeger_urls"] == []
    with pytest.raises(ValueError):
        render(d, "yaml")
