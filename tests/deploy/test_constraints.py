"""constraints.txt pins the whole install (CI's `make install`, the image's build stage): every
dependency pyproject.toml names, with an exact version that satisfies pyproject's own range."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from hoptrace.settings import PROJECT_ROOT


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = version
    return out


def test_every_dependency_is_pinned_within_its_range() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += [d for d in extra if not d.startswith("hoptrace")]
    pinned = pins()
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{req.name}=={pinned[name]} does not satisfy pyproject's {req.specifier}"
        )


def test_opentelemetry_contrib_packages_come_from_one_release() -> None:
    """The contrib packages pin opentelemetry-instrumentation exactly: one release for all."""
    contrib = {
        n: v
        for n, v in pins().items()
        if re.fullmatch(r"opentelemetry-(instrumentation.*|processor-.*|util-http)", n)
    }
    assert len(contrib) >= 5 and len(set(contrib.values())) == 1, contrib
