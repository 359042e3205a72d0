"""The service registry on its own (no services running): every service runs a step of the
reference spec, each fault switch is a hook or an option change the runner applies, and the
HTTP hooks do what their fault says."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from hoptrace.contract import load_spec
from hoptrace.instrumentation.hop import HopHooks, HopOptions
from hoptrace.settings import Settings
from hoptrace.workers import faults
from hoptrace.workers.admin_service import SERVICE as ADMIN
from hoptrace.workers.admin_service import build_app
from hoptrace.workers.http import instrumented
from hoptrace.workers.payment_service import SERVICE as PAYMENT
from hoptrace.workers.registry import FAULTS, SERVICES
from hoptrace.workers.service import HopSetup, HopWorker, HttpService, Kind
from tests.support import REFERENCE_SPEC


def _setup(service: str) -> HopSetup:
    spec = load_spec(REFERENCE_SPEC)
    return HopSetup(
        spec.step_for_service(service),
        HopOptions(bootstrap="127.0.0.1:1", database_url="postgresql://x@127.0.0.1:1/x"),
        HopHooks(),
    )


def test_every_service_runs_a_step_of_the_reference_spec() -> None:
    spec = load_spec(REFERENCE_SPEC)
    assert sorted(SERVICES) == sorted(spec.services + [s.calls for s in spec.steps if s.calls])
    for name, service in SERVICES.items():
        assert service.name == name
        if isinstance(service, HopWorker):
            assert service.kind == Kind.HOP_WORKER
            assert service.consumes == spec.step_for_service(name).event_type
            assert service.port(Settings()) is None
        else:
            assert isinstance(service, HttpService) and service.kind == Kind.HTTP_SERVICE
            assert service.port(Settings()) in {8081, 8082}


def test_faults_are_the_registry_s_and_each_has_a_description() -> None:
    assert FAULTS["allocation-worker"] == ("no-verify", "wrong-group", "slow", "crash-after-write")
    assert set(FAULTS["payment-service"]) == {"skip-emit", "crash-after-write"}
    assert set(FAULTS["admin-service"]) == {"http-500", "silent-no-write"}
    for service in SERVICES.values():
        for fault in service.faults:
            assert fault.description and "\n" not in fault.description, fault.name


def test_hop_worker_faults_change_only_hooks_and_options() -> None:
    worker = SERVICES["allocation-worker"]
    base = _setup("allocation-worker")
    step = base.step

    no_verify = worker.fault("no-verify").apply(base)
    assert no_verify.options == base.options.replace(verify_effect=False)
    assert no_verify.hooks == base.hooks

    wrong = worker.fault("wrong-group").apply(base)
    assert wrong.options.group == f"{step.group}{faults.WRONG_GROUP_SUFFIX}"
    assert wrong.options.auto_offset_reset == "latest"
    assert wrong.step == step

    slow = worker.fault("slow").apply(base)
    assert slow.hooks.before_handle is not None and slow.hooks.after_db_commit is None
    assert slow.options == base.options

    crash = worker.fault("crash-after-write").apply(base)
    assert crash.hooks.after_db_commit is not None and crash.hooks.before_handle is None
    assert base.hooks == HopHooks(), "the setup a fault was applied to is unchanged"


def test_payment_service_faults_are_write_path_hooks() -> None:
    assert PAYMENT.hooks_for(None) == PAYMENT.hooks
    assert PAYMENT.hooks.emit and PAYMENT.hooks.after_write is None
    skip = PAYMENT.hooks_for(PAYMENT.fault("skip-emit"))
    assert not skip.emit and skip.after_write is None
    crash = PAYMENT.hooks_for(PAYMENT.fault("crash-after-write"))
    assert crash.emit and crash.after_write is not None


async def test_admin_http_500_answers_500_before_the_endpoint_runs() -> None:
    # no pool: the endpoint would fail on it; the fault's middleware answers first
    app = build_app(None, ADMIN.hooks_for(ADMIN.fault("http-500")))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        resp = await client.post("/allocations", json={"correlation_id": "c-1"})
    assert resp.status_code == 500
    assert "http-500" in resp.json()["error"]


async def test_instrumented_apps_record_the_server_span_only() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def hello(_request: object) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = instrumented(Starlette(routes=[Route("/hello", hello)]), tracer_provider=provider)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.get("/hello")).text == "hi"
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["GET /hello"], [s.name for s in spans]
