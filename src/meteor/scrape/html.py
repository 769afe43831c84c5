"""Stack Exchange HTML bodies -> Markdown.

Code blocks (``<pre><code>``) become fenced blocks with the language from Stack Overflow's
``lang-xx`` class when present, inline ``<code>`` becomes backticks and entities are decoded.
Markdown escaping of ``_`` and ``*`` is turned off: bodies are model training text, and identifiers
like ``max_len`` must stay readable.
"""

from __future__ import annotations

import re

from markdownify import markdownify

_BLANK_LINES = re.compile(r"\n{3,}")


def _code_language(pre) -> str:
    """``<pre class="lang-py prettyprint-override">`` -> ``py``; no language class -> ``""``."""
    for cls in pre.get("class") or []:
        if cls.startswith("lang-") and cls != "lang-none":
            return cls[len("lang-"):]
    return ""


def html_to_markdown(html: str) -> str:
    text = markdownify(
        html,
        heading_style="ATX",
        bullets="-",
        escape_underscores=False,
        escape_asterisks=False,
        escape_misc=False,
        code_language_callback=_code_language,
    )
    return _BLANK_LINES.sub("\n\n", text).strip()
