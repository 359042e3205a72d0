"""Build hoptrace as a wheel (and hoptrace_native when cargo exists) and install it into a fresh
virtualenv in a temporary folder, as a user installs it: from the wheel files only, with the
project's constraints, no checkout on the path.

Dependencies come from a wheelhouse next to the local stack's jar cache
(``<cache>/wheelhouse``): the first run fills it with ``pip download`` from the package index,
later runs install from it offline (``--no-index``), in seconds. A run whose constraints changed
fills in what is missing."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from hoptrace.settings import PROJECT_ROOT

#: What the wheel is built from (what the Dockerfile's build stage copies, plus the spec copy
#: that lives in core/): pyproject, README and every folder pyproject maps a package to.
_PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
SOURCES = (
    "pyproject.toml",
    "README.md",
    *sorted(set(_PYPROJECT["tool"]["setuptools"]["package-dir"].values())),
)
CONSTRAINTS = PROJECT_ROOT / "constraints.txt"


@dataclass
class Installed:
    venv: Path
    wheels: list[Path]
    native: bool
    #: seconds each stage took (build, venv, install)
    took: dict[str, float] = field(default_factory=dict)

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def hoptrace(self) -> str:
        return str(self.bin / "hoptrace")

    @property
    def python(self) -> str:
        return str(self.bin / "python")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no HOPTRACE_*, OTEL_*, PYTHONPATH or virtualenv of
    the test run; ``extra`` added."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HOPTRACE_", "OTEL_", "PYTHON", "PYTEST", "VIRTUAL_ENV", "PIP_REQ"))
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p
    )
    return {**env, **extra}


def _run(
    cmd: list[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=clean_env(), check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def build_wheels(dist: Path, workdir: Path) -> tuple[list[Path], bool]:
    """hoptrace's wheel from a copy of its sources (nothing else of the checkout), and
    hoptrace_native's from ``native/`` (its cargo target folder makes a rebuild quick) when
    cargo exists. Returns the wheels and whether the native one is among them."""
    ctx = workdir / "src"
    ctx.mkdir()
    for name in SOURCES:
        src = PROJECT_ROOT / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, ctx / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist)]
    _run([*pip, str(ctx)], timeout=300)
    native = shutil.which("cargo") is not None or (Path.home() / ".cargo/bin/cargo").exists()
    if native:
        _run([*pip, str(PROJECT_ROOT / "native")], timeout=600)
    return sorted(dist.glob("*.whl")), native


def install(wheels: list[Path], venv: Path, wheelhouse: Path) -> dict[str, float]:
    """A fresh virtualenv with the wheels and their dependencies (pinned by the constraints),
    installed by the test run's pip (``pip --python``)."""
    took: dict[str, float] = {}
    t0 = time.monotonic()
    # without its own pip (ensurepip takes ~10 s): the test run's pip installs into it
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    took["venv"] = time.monotonic() - t0
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    pip += ["-q", "--no-compile", "-c", str(CONSTRAINTS)]  # .pyc are written on first import
    wheelhouse.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(wheelhouse / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs fill it once
        offline = subprocess.run(
            [*pip, "--no-index", "--find-links", str(wheelhouse), *map(str, wheels)],
            capture_output=True, text=True, timeout=600, env=clean_env(), check=False,
        )  # fmt: skip
        if offline.returncode != 0:  # first run, or new pins: fetch what is missing, once
            deps = [w for w in wheels if not w.name.startswith("hoptrace_native")]
            _run(
                [sys.executable, "-m", "pip", "download", "-q", "-c", str(CONSTRAINTS),
                 "-d", str(wheelhouse), "--find-links", str(wheels[0].parent), *map(str, deps)],
                timeout=1200,
            )  # fmt: skip
            for stale in wheelhouse.glob("hoptrace-*.whl"):  # only dependencies stay
                stale.unlink()
            _run([*pip, "--no-index", "--find-links", str(wheelhouse), *map(str, wheels)], 600)
    took["install"] = time.monotonic() - t0
    return took
