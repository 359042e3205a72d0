"""The switch and the version checks of the speed-ups: ``HOPTRACE_ACCEL=0`` turns each off, a
library at a version no differential test ran against turns its speed-up off by itself with one
log line saying which and why, and the caller then takes the plain path (here: HttpClient on
httpx's AsyncClient). Also the instrumentation settings and the suppression-honouring tracer
the plain path relies on."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hoptrace.instrumentation import _accel
from hoptrace.instrumentation._accel import Speedup, enabled, why_off
from hoptrace.instrumentation.http import HttpClient
from hoptrace.instrumentation.quiet import SuppressibleTracerProvider, quiet
from hoptrace.instrumentation.settings import instrumentation_settings


@pytest.fixture
def fresh_decisions() -> Iterator[None]:
    """Each speed-up decided anew in the test, and again after it."""
    enabled.cache_clear()
    yield
    enabled.cache_clear()


def test_every_speedup_pins_tested_versions() -> None:
    assert set(_accel.TESTED) == set(Speedup) == set(_accel.PLAIN_PATH)
    assert all(versions for pins in _accel.TESTED.values() for versions in pins.values())


def test_the_switch_turns_every_speedup_off(monkeypatch, fresh_decisions, caplog) -> None:
    monkeypatch.setenv("HOPTRACE_ACCEL", "0")
    caplog.set_level(logging.INFO, logger=_accel.__name__)
    assert all(why_off(s) == "HOPTRACE_ACCEL=0" for s in Speedup)
    assert not any(enabled(s) for s in Speedup)
    assert not any(enabled(s) for s in Speedup)  # decided once: one line each
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(Speedup)
    assert all("is off (HOPTRACE_ACCEL=0)" in line for line in lines)


def test_an_untested_version_turns_its_speedup_off_by_itself(
    monkeypatch, fresh_decisions, caplog
) -> None:
    monkeypatch.setenv("HOPTRACE_ACCEL", "1")
    monkeypatch.setitem(
        _accel.TESTED, Speedup.HTTP_TRANSPORT, {"httpx": frozenset({"0.0.1"}), "httpcore": _any()}
    )
    caplog.set_level(logging.INFO, logger=_accel.__name__)
    reason = why_off(Speedup.HTTP_TRANSPORT)
    assert reason == f"httpx {httpx.__version__} is not a tested version (0.0.1)"
    assert not enabled(Speedup.HTTP_TRANSPORT)
    client = HttpClient("http://127.0.0.1:9")  # the plain path, by itself
    assert isinstance(client._client, httpx.AsyncClient) and client._transports is None
    (line,) = [r for r in caplog.records if "http_transport" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert reason in line.getMessage() and "httpx's AsyncClient" in line.getMessage()


def test_a_missing_library_turns_its_speedup_off(monkeypatch, fresh_decisions) -> None:
    monkeypatch.setenv("HOPTRACE_ACCEL", "1")
    monkeypatch.setitem(_accel.TESTED, Speedup.OTLP, {"no-such-dist-hoptrace": _any()})
    assert why_off(Speedup.OTLP) == (
        "no-such-dist-hoptrace (not installed) is not a tested version (any)"
    )


def _any() -> frozenset[str]:
    return frozenset({"any"})


def test_settings_read_the_environment(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("HOPTRACE_EXPORT_HOLD_S", "7.5")
    monkeypatch.setenv("HOPTRACE_EXPORT_STATS_DIR", str(tmp_path))
    monkeypatch.setenv("HOPTRACE_ACCEL", "false")
    got = instrumentation_settings()
    assert (got.export_hold_s, got.export_stats_dir, got.accel) == (7.5, tmp_path, False)
    monkeypatch.setenv("HOPTRACE_EXPORT_HOLD_S", "soon")  # malformed: its default, said once
    got = instrumentation_settings()
    assert got.export_hold_s == 60.0 and got.accel is False
    assert "export_hold_s" in caplog.text


def test_the_suppressible_tracer_makes_no_span_while_suppressed() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = SuppressibleTracerProvider(provider).get_tracer("lib", "1.0")
    with quiet(), tracer.start_as_current_span("hidden") as span:
        assert span is trace.INVALID_SPAN
    with suppress_instrumentation():
        assert tracer.start_span("hidden") is trace.INVALID_SPAN
    with tracer.start_as_current_span("shown"):
        tracer.start_span("child").end()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["child", "shown"]
    assert spans[1].instrumentation_scope.name == "lib"  # the real tracer's scope
    assert spans[0].parent.span_id == spans[1].context.span_id
