"""README's example specs load: the guide for your own pipeline stays true."""

from __future__ import annotations

import re
import tomllib

from hoptrace.contract import parse_spec
from hoptrace.settings import PROJECT_ROOT


def test_every_toml_spec_in_the_readme_loads() -> None:
    text = (PROJECT_ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "[pipeline]" in b]
    assert blocks
    for block in blocks:
        spec = parse_spec(tomllib.loads(block))
        assert spec.steps
    fan_out = parse_spec(tomllib.loads(next(b for b in blocks if "after = " in b)))
    assert [s.id for s in fan_out.leaves] == ["receipt.sent", "session.created"]
