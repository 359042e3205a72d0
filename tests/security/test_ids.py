"""The shared correlation id check (``hoptrace.ids``) and its use at each entry point."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hoptrace.collector import api
from hoptrace.ids import MAX_LENGTH, is_valid_correlation_id, validate_correlation_id
from hoptrace.workers.admin_service import AllocationRequest

from .conftest import INJECTIONS

VALID = ["a", "0", "pay-1", "3f2c9a1e-5b7d-4c1a-9e8f-0a1b2c3d4e5f", "ord:2026.11_27", "x" * 128]


@pytest.mark.parametrize("cid", VALID)
def test_valid_ids_pass_unchanged(cid: str) -> None:
    assert validate_correlation_id(cid) == cid
    assert is_valid_correlation_id(cid)
    assert api.validate_id(cid) == cid
    assert AllocationRequest(correlation_id=cid, student="s", course="c").correlation_id == cid


@pytest.mark.parametrize("cid", [*INJECTIONS, "", "-lead", ".dot", "a b", "é", "a\x00", " a"])
def test_invalid_ids_are_refused_everywhere(cid: str) -> None:
    with pytest.raises(ValueError, match="not a valid correlation id"):
        validate_correlation_id(cid)
    assert not is_valid_correlation_id(cid)
    with pytest.raises(api.MalformedId):
        api.validate_id(cid)
    with pytest.raises(ValidationError, match="not a valid correlation id"):
        AllocationRequest(correlation_id=cid, student="s", course="c")


def test_messages_say_why() -> None:
    with pytest.raises(ValueError, match="empty"):
        validate_correlation_id("")
    with pytest.raises(ValueError, match=f"129 characters long \\(at most {MAX_LENGTH}\\)"):
        validate_correlation_id("x" * 129)
    with pytest.raises(ValueError, match="must be a string"):
        validate_correlation_id(5)  # type: ignore[arg-type]
    long = "y" * 10_000
    with pytest.raises(ValueError) as err:
        validate_correlation_id(long)
    assert len(str(err.value)) < 200  # the message never echoes a huge input


def test_trailing_newline_is_refused() -> None:
    """Regression: the diagnosis API's ``^...$`` pattern with ``re.match`` accepted "abc\\n"."""
    with pytest.raises(api.MalformedId):
        api.validate_id("abc\n")
