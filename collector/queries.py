"""Alias of :mod:`hoptrace.collector.store` (the read API)."""

from .store import *  # noqa: F403
from .store import __all__ as __all__  # noqa: F401
