"""`hoptrace check deploy [--compose FILE]`: is every step of the pipeline deployed, and every topic
it needs created, by this compose file? (The incident's root causes #1 and #3, before deploy.)

Checks, against the configured pipeline spec (``HOPTRACE_PIPELINE``):

* every step's service is a compose service (by service name, or a service whose command runs
  ``hoptrace worker NAME``), not scaled to 0 and not hidden behind a profile;
* every topic of the spec (dead-letter topics included) is created by the file: a service that
  runs ``hoptrace topics ensure`` for the same pipeline, or explicit ``kafka-topics --create
  --topic NAME`` commands;
* no worker runs under another consumer group than the spec's: a ``*GROUP*`` variable with
  another value, or a fault switch (``HOPTRACE_FAULT=NAME`` / ``--fault NAME``) that the caller's
  ``group_faults`` table says runs the worker under another group.

The check knows only the spec and the compose file. Which fault switches change a worker's group
is the workers' knowledge: the caller passes it as a small declarative table (fault name -> the
group it consumes as, a template on the spec's group such as ``"{group}-old"``).

Exit 0 when all is there, 1 with the precise list of what is missing, 2 for an unreadable file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
import yaml

from hoptrace.contract import PipelineSpec, SpecError, load_spec
from hoptrace.contract.conventions import DLQ_SUFFIX
from hoptrace.settings import get_settings

_WORKER = re.compile(r"(?:^|\s)worker\s+([A-Za-z0-9_.-]+)")
_ENSURE = re.compile(r"(?:^|\s)topics\s+ensure(?:\s|$)")
_TOPIC_CREATE = re.compile(r"--create\b")
_TOPIC_NAME = re.compile(r"--topic[=\s]+['\"]?([A-Za-z0-9._-]+)")
_FAULT = re.compile(r"--fault[=\s]+['\"]?([A-Za-z0-9_-]+)")
_INTERP = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?=+])?([^}]*)\}")
#: The environment variable that switches a fault on for `hoptrace worker` (also ``--fault``).
FAULT_ENV = "HOPTRACE_FAULT"

#: Fault switches that run a worker under another consumer group than the spec's: fault name ->
#: the group it consumes as, a ``str.format`` template on the spec's group (``{group}``).
GroupFaults = Mapping[str, str]


class ComposeError(ValueError):
    """The compose file cannot be read."""


@dataclass
class DeployReport:
    compose: Path
    pipeline: str
    spec_path: Path | None
    problems: list[str] = field(default_factory=list)
    services: dict[str, str] = field(default_factory=dict)  # step service -> compose service
    topics: dict[str, str] = field(default_factory=dict)  # topic -> compose service creating it

    @property
    def ok(self) -> bool:
        return not self.problems


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _command(svc: dict[str, Any]) -> str:
    return f"{_text(svc.get('entrypoint'))} {_text(svc.get('command'))}".strip()


def _resolve(value: Any) -> str:
    """``${VAR:-default}`` -> ``default`` (what the file says without an .env)."""
    return _INTERP.sub(lambda m: m.group(1), str(value)) if value is not None else ""


def _env(svc: dict[str, Any]) -> dict[str, str]:
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        out = {}
        for item in raw:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): _resolve(v) for k, v in raw.items()}


def load_compose(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ComposeError(f"{path}: compose file not found") from None
    except yaml.YAMLError as exc:
        raise ComposeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise ComposeError(f"{path}: no 'services' mapping")
    return {str(k): (v or {}) for k, v in doc["services"].items()}


def _same_pipeline(env: dict[str, str], spec: PipelineSpec) -> bool:
    declared = env.get("HOPTRACE_PIPELINE")
    if not declared or spec.source is None:
        return True  # the default pipeline
    return Path(declared).name == spec.source.name


def check_deploy(
    compose_path: str | Path, spec: PipelineSpec, group_faults: GroupFaults | None = None
) -> DeployReport:
    """Compare a compose file with a pipeline spec; ``report.problems`` lists what is missing.
    ``group_faults``: the fault switches that change a worker's consumer group (none: only
    ``*GROUP*`` variables are checked)."""
    group_faults = group_faults or {}
    path = Path(compose_path)
    services = load_compose(path)
    report = DeployReport(path, spec.name, spec.source)

    # -- services --------------------------------------------------------------------------
    runs: dict[str, str] = {}  # step service -> compose service
    for name, svc in services.items():
        cmd = _command(svc)
        match = _WORKER.search(cmd)
        if match:
            runs.setdefault(match.group(1), name)
        runs.setdefault(name, name)
    for step in spec.steps:
        where = runs.get(step.service)
        if where is None:
            report.problems.append(
                f"step {step.id}: service {step.service} is not deployed (no compose service named "
                f"{step.service} and none runs `hoptrace worker {step.service}`)"
            )
            continue
        report.services[step.service] = where
        svc = services[where]
        replicas = (svc.get("deploy") or {}).get("replicas")
        if replicas is not None and int(replicas) == 0:
            report.problems.append(f"step {step.id}: service {where} is scaled to 0 replicas")
        if svc.get("profiles"):
            profiles = ", ".join(map(str, svc["profiles"]))
            report.problems.append(
                f"step {step.id}: service {where} only starts with profile(s) {profiles}"
            )
        # -- consumer group ---------------------------------------------------------------
        if step.group:
            env = _env(svc)
            faults = [env.get(FAULT_ENV, "")] + _FAULT.findall(_command(svc))
            for fault in dict.fromkeys(f for f in faults if f in group_faults):
                group = group_faults[fault].format(group=step.group)
                report.problems.append(
                    f"step {step.id}: service {where} runs with fault {fault} (consumer group "
                    f"{group} instead of {step.group})"
                )
            for key, value in env.items():
                if "GROUP" in key.upper() and value and value != step.group:
                    report.problems.append(
                        f"step {step.id}: service {where} sets {key}={value}, the spec's consumer "
                        f"group is {step.group}"
                    )

    # -- topics ----------------------------------------------------------------------------
    created: dict[str, str] = {}
    for name, svc in services.items():
        cmd = _command(svc)
        if _ENSURE.search(cmd):
            if _same_pipeline(_env(svc), spec):
                for topic in spec.topics:
                    created.setdefault(topic, name)
            else:
                report.problems.append(
                    f"service {name} runs `topics ensure` for another pipeline "
                    f"({_env(svc).get('HOPTRACE_PIPELINE')})"
                )
        for part in re.split(r"&&|;|\n", cmd):
            if _TOPIC_CREATE.search(part):
                for topic in _TOPIC_NAME.findall(part):
                    created.setdefault(topic, name)
    report.topics = {t: created[t] for t in spec.topics if t in created}
    for topic in spec.topics:
        if topic not in created:
            kind = "dead-letter topic" if topic.endswith(DLQ_SUFFIX) else "topic"
            report.problems.append(
                f"{kind} {topic} is not created (no `hoptrace topics ensure` service and no "
                f"`kafka-topics --create --topic {topic}`)"
            )
    return report


def format_report(report: DeployReport) -> str:
    head = f"{report.compose} against pipeline {report.pipeline}"
    if report.spec_path:
        head += f" ({report.spec_path})"
    if report.ok:
        return (
            f"ok: {head}: {len(report.services)} step services deployed, "
            f"{len(report.topics)} topics created"
        )
    lines = [f"{len(report.problems)} problem(s): {head}"]
    lines += [f"  - {p}" for p in report.problems]
    return "\n".join(lines)


def check_deploy_cli(compose_path: str, group_faults: GroupFaults | None = None) -> None:
    """`hoptrace check deploy`: print the report; exit 0, 1 (problems) or 2 (unreadable)."""
    try:
        spec = load_spec(get_settings().pipeline)
        report = check_deploy(compose_path, spec, group_faults)
    except (ComposeError, SpecError) as exc:
        typer.echo(f"hoptrace: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_report(report))
    raise typer.Exit(0 if report.ok else 1)


__all__ = [
    "ComposeError",
    "DeployReport",
    "GroupFaults",
    "check_deploy",
    "check_deploy_cli",
    "format_report",
]
