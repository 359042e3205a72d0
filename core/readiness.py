"""Readiness signal for processes started by `hoptrace dev`: a service calls :func:`mark_ready`
once it can do its job (listening, consumer joined); `dev up` waits for that file."""

from __future__ import annotations

import os
from pathlib import Path


def mark_ready() -> None:
    path = os.environ.get("HOPTRACE_READY_FILE")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(str(os.getpid()))


def clear_ready() -> None:
    path = os.environ.get("HOPTRACE_READY_FILE")
    if path:
        Path(path).unlink(missing_ok=True)
