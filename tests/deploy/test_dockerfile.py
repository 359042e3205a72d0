"""The Dockerfile, checked without a Docker engine: its structure (slim pinned base, non-root,
ENTRYPOINT hoptrace), and its install step run for real on exactly the files it COPYs: a wheel
built from that context holds every hoptrace package the image needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from hoptrace.settings import PROJECT_ROOT

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def build_arg(name: str) -> str:
    for word, rest in instructions():
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"ARG {name} not found")


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def build_stage_copies() -> list[str]:
    """Sources of the COPY instructions of the build stage (before the second FROM)."""
    ins = instructions()
    froms = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    sources = []
    for word, rest in ins[froms[0] : froms[-1]]:
        if word == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    return sources


def test_base_image_is_a_pinned_slim_python_311() -> None:
    image = build_arg("PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
    assert all(
        rest == "${PYTHON_IMAGE}" or "AS" in rest for w, rest in instructions() if w == "FROM"
    )


def test_runs_as_a_non_root_user() -> None:
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_entrypoint_is_hoptrace() -> None:
    entrypoints = [rest for word, rest in final_stage() if word == "ENTRYPOINT"]
    assert entrypoints == ['["hoptrace"]']


def test_pipeline_spec_is_where_the_image_points() -> None:
    stage = " ".join(f"{word} {rest}" for word, rest in final_stage())
    assert "COPY pipelines /app/pipelines" in stage
    assert "HOPTRACE_PIPELINE=/app/pipelines/payments.toml" in stage
    assert (PROJECT_ROOT / "pipelines" / "payments.toml").exists()


def test_copies_every_package_folder_of_pyproject() -> None:
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    copied = {s.rstrip("/") for s in build_stage_copies()}
    assert folders <= copied, folders - copied
    dockerignore = (PROJECT_ROOT / ".dockerignore").read_text().split()
    for folder in folders | {"pyproject.toml", "pipelines"}:
        assert folder not in dockerignore, f".dockerignore drops {folder}"


@pytest.mark.timeout(300)
def test_install_step_builds_a_complete_wheel_from_the_copied_files(tmp_path: Path) -> None:
    """`pip install .` of the build stage, run on a context holding only what it COPYs (with
    build isolation, as in the image: setuptools and wheel come from the package index)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for source in build_stage_copies():
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
