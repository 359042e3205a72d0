"""Readiness signal for processes started by `hoptrace dev`: a service calls :func:`mark_ready`
once it can do its job (listening, consumer joined); `dev up` waits for that file
(``HOPTRACE_READY_FILE``, :class:`~hoptrace.settings.ProcessSettings`)."""

from __future__ import annotations

import os

from hoptrace.settings import ProcessSettings


def mark_ready() -> None:
    path = ProcessSettings().ready_file
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(os.getpid()))


def clear_ready() -> None:
    path = ProcessSettings().ready_file
    if path:
        path.unlink(missing_ok=True)
