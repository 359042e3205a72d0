"""Correlation ids: the one format every entry point accepts (CLI, HTTP services, dashboard,
collector indexing). Letters and digits first, then letters, digits, ``.``, ``_``, ``:``, ``-``;
1 to 128 characters. Anything else is refused before it reaches a query."""

from __future__ import annotations

import re

MAX_LENGTH = 128
PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def is_valid_correlation_id(value: object) -> bool:
    """True when ``value`` is a string in the correlation id format."""
    return isinstance(value, str) and PATTERN.fullmatch(value) is not None


def validate_correlation_id(value: str) -> str:
    """``value`` unchanged when it is a valid correlation id; ValueError saying why otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"a correlation id must be a string, not {type(value).__name__}")
    if is_valid_correlation_id(value):
        return value
    shown = value if len(value) <= 60 else f"{value[:60]}..."
    if not value:
        why = "it is empty"
    elif len(value) > MAX_LENGTH:
        why = f"it is {len(value)} characters long (at most {MAX_LENGTH})"
    else:
        why = "it must start with a letter or digit and hold only letters, digits, . _ : -"
    raise ValueError(f"{shown!r} is not a valid correlation id: {why}")


__all__ = ["MAX_LENGTH", "PATTERN", "is_valid_correlation_id", "validate_correlation_id"]
