"""Text from users and from spans (a typed ``?id=``, status messages, evidence lines, next
actions) shown inside Streamlit's Markdown as the text it is.

Streamlit renders an element's body as GitHub-flavoured Markdown with its own extensions
(``:color[...]`` directives, ``:emoji:`` shortcodes, ``$LaTeX$``), so a raw id such as
``[log in](http://evil.test)`` would become a link. :func:`literal` backslash-escapes every ASCII
punctuation character Markdown or those extensions act on (CommonMark lets any ASCII punctuation
be escaped, and an escaped character is plain text), breaks bare URLs (``http\\://``,
``www\\.``), keeps the text on one line (no block structure) and drops control characters.
Letters, digits, spaces, quotes and ``-`` stay as they are, so the text still reads the same.
"""

from __future__ import annotations

import re

#: Characters escaped wherever they are: Markdown's inline syntax (emphasis, code, links,
#: images, autolinks, HTML, entities, tables, strikethrough, headings), the GFM autolink
#: triggers (``:`` of a scheme, ``.`` of ``www.``, ``@`` of an email) and Streamlit's
#: extensions (``:`` directives and shortcodes, ``$`` maths).
_ACTIVE = re.compile(r"([\\`*_{}\[\]()<>#|~$!&:.@=+^])")
#: C0 and C1 controls (a newline included: the text stays on its line), DEL, and the Unicode
#: line and paragraph separators.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def literal(text: object) -> str:
    """``text`` escaped so that Streamlit's Markdown shows it verbatim (on one line)."""
    flat = _CONTROLS.sub(" ", str(text)).lstrip()  # leading spaces would make a code block
    escaped = _ACTIVE.sub(r"\\\1", flat)
    # a leading "-" would start a list ("*", "+" and the "." of "1." are escaped already)
    return "\\" + escaped if escaped.startswith("-") else escaped
