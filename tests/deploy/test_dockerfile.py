"""The Dockerfile, checked without a Docker engine: BuildKit's own Dockerfile frontend (parser,
instruction checks, parse-time build checks; tools/dockerfilecheck) accepts it, its structure
(slim pinned base, non-root, ENTRYPOINT hoptrace) is read from that parse, and its install step
is run for real on exactly the files it COPYs: a wheel built from that context holds every
hoptrace package the image needs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from hoptrace.settings import PROJECT_ROOT

from .gotools import clean_env, go_tool, timeout_for

pytestmark = timeout_for("dockerfilecheck", 120)

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def dockerfilecheck(path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(go_tool("dockerfilecheck")), *flags, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )


@pytest.fixture(scope="module")
def parsed() -> dict[str, Any]:
    """The Dockerfile as BuildKit's frontend parses it (stages, copies, user, entrypoint)."""
    proc = dockerfilecheck(DOCKERFILE, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stage(parsed: dict[str, Any], name: str) -> dict[str, Any]:
    return next(st for st in parsed["stages"] if st.get("name") == name)


def build_stage_copies(parsed: dict[str, Any], name: str = "build") -> list[str]:
    """The build context paths a stage COPYs (copies from other stages excluded)."""
    return [src for c in stage(parsed, name)["copies"] if "from" not in c for src in c["sources"]]


def test_buildkit_frontend_accepts_it_without_warnings() -> None:
    proc = dockerfilecheck(DOCKERFILE)
    assert proc.returncode == 0, proc.stderr
    assert "no build-check warning" in proc.stdout


def test_buildkit_frontend_rejects_broken_variants(tmp_path: Path) -> None:
    """Proves the checker checks: a parse error and a build-check rule both fail it."""
    text = DOCKERFILE.read_text()
    bad = tmp_path / "Dockerfile"
    bad.write_text(text.replace(" AS build", " as build"))
    proc = dockerfilecheck(bad)
    assert proc.returncode == 1 and "FromAsCasing" in proc.stderr, proc.stderr
    bad.write_text(text.replace("COPY pipelines /app/pipelines", "COPY pipelines"))
    proc = dockerfilecheck(bad)
    assert proc.returncode == 1 and "COPY requires at least two arguments" in proc.stderr


def test_base_image_is_a_pinned_slim_python_311(parsed: dict[str, Any]) -> None:
    image = parsed["meta_args"]["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
    # every stage but the toolchain donor (its files are copied, it is never run) is Python's
    assert {st["base"] for st in parsed["stages"] if st.get("name") != "rust"} == {
        "${PYTHON_IMAGE}"
    }
    assert re.fullmatch(r"rust:1\.\d+-slim(-\w+)?", parsed["meta_args"]["RUST_IMAGE"])


def test_runs_as_a_non_root_user(parsed: dict[str, Any]) -> None:
    user = parsed["stages"][-1].get("user", "")
    assert user, "no USER in the final stage"
    assert user.split(":")[0] not in ("root", "0")


def test_entrypoint_is_hoptrace(parsed: dict[str, Any]) -> None:
    final = parsed["stages"][-1]
    assert final["entrypoint"] == ["hoptrace"]
    assert not final.get("entrypoint_shell_form")


def test_pipeline_spec_is_where_the_image_points(parsed: dict[str, Any]) -> None:
    final = parsed["stages"][-1]
    assert {"sources": ["pipelines"], "dest": "/app/pipelines"} in final["copies"]
    assert "HOPTRACE_PIPELINE=/app/pipelines/payments.toml" in final["env"]
    assert "HOPTRACE_BIND_HOST=0.0.0.0" in final["env"]
    assert (PROJECT_ROOT / "pipelines" / "payments.toml").exists()
    assert {"sources": ["/opt/hoptrace"], "dest": "/opt/hoptrace", "from": "build"} in final[
        "copies"
    ]


def test_copies_every_package_folder_of_pyproject(parsed: dict[str, Any]) -> None:
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    copied = {s.rstrip("/") for s in build_stage_copies(parsed)}
    assert folders <= copied, folders - copied
    dockerignore = (PROJECT_ROOT / ".dockerignore").read_text().split()
    for folder in folders | {"pyproject.toml", "pipelines"}:
        assert folder not in dockerignore, f".dockerignore drops {folder}"


@pytest.mark.timeout(300)
def test_install_step_builds_a_complete_wheel_from_the_copied_files(
    tmp_path: Path, parsed: dict[str, Any]
) -> None:
    """`pip install .` of the build stage, run on a context holding only what it COPYs (with
    build isolation, as in the image: setuptools and wheel come from the package index)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for source in build_stage_copies(parsed):
        for path in PROJECT_ROOT.glob(source):
            if path.is_dir():
                shutil.copytree(
                    path, ctx / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                shutil.copy2(path, ctx / path.name)
    if not (ctx / "README.md").exists():  # the lead's README lands later; pyproject names it
        (ctx / "README.md").write_text("hoptrace\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path / "dist"), str(ctx)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hoptrace-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        init = package.replace(".", "/") + "/__init__.py"
        assert init in names, f"{init} missing from the image's install"
    for module in (
        "hoptrace/cli.py",
        "hoptrace/workers/run.py",
        "hoptrace/workers/topics.py",
        "hoptrace/dashboard/app.py",
        "hoptrace/dashboard/serve.py",
    ):
        assert module in names, module
    pages = [n for n in names if n.startswith("hoptrace/dashboard/pages/")]
    assert pages, "dashboard pages are not packaged"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hoptrace = hoptrace.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.timeout(300)
def test_native_stage_builds_the_codec_wheel_from_the_copied_files(
    tmp_path: Path, parsed: dict[str, Any]
) -> None:
    """The native stage's `pip wheel ./native`, run on exactly what it COPYs: an abi3 wheel of
    hoptrace_native that the build stage installs (and imports) beside hoptrace."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for source in build_stage_copies(parsed, "native"):
        shutil.copytree(
            PROJECT_ROOT / source, ctx / source, ignore=shutil.ignore_patterns("target")
        )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path / "wheels"), str(ctx / "native")],
        capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("hoptrace_native-*.whl")
    assert "abi3" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("hoptrace_native/") and n.endswith(".so") for n in names), names
    build = stage(parsed, "build")
    assert {"sources": ["/wheels"], "dest": "/wheels", "from": "native"} in build["copies"]
    text = DOCKERFILE.read_text()
    assert (
        "pip install -c constraints.txt . /wheels/*.whl" in text
        and 'python -c "import hoptrace_native"' in text
    )
