"""Reading what an AppTest run shows, shared by the page tests."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest


def show(at: AppTest, page: str | None, query: dict[str, str]) -> AppTest:
    """Open ``page`` (the lookup page when None) with ``query`` params and run it."""
    for k, v in query.items():
        at.query_params[k] = v
    if page:
        at.switch_page(f"pages/{page}.py")
    return at.run()


def text(at: AppTest) -> str:
    parts = (
        [m.value for m in at.markdown] + [e.value for e in at.error] + [e.value for e in at.info]
    )
    parts += [e.value for e in at.success] + [e.value for e in at.warning]
    return "\n".join(str(p) for p in parts)
