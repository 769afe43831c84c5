"""Stack Exchange HTML bodies -> Markdown.

Code blocks (``<pre><code>``) become fenced blocks with the language from Stack Overflow's
``lang-xx`` class when present, inline ``<code>`` becomes backticks and entities are decoded.
Markdown escaping of ``_`` and ``*`` is turned off: bodies are model training text, and identifiers
like ``max_len`` must stay readable.

Conversion is the costly part of reading a dump (a few ms per body), so it avoids two overheads of
plain ``markdownify(html)`` while giving the same output: the converter (whose options and
per-tag function cache markdownify rebuilds on every call) is built once, and the soup is built
with a ``Tag`` whose ``find_parent`` is a plain walk up the tree (markdownify asks every tag for
its ``<pre>`` ancestor, and bs4's generic search machinery made that ~15% of the time). bs4's
``lxml`` parser was measured too: slower than ``html.parser`` here (bs4's tree building, not the
tokenizer, dominates), so it is not used.
"""

from __future__ import annotations

import re

from bs4 import BeautifulSoup, Tag
from markdownify import MarkdownConverter

_BLANK_LINES = re.compile(r"\n{3,}")


def _code_language(pre) -> str:
    """``<pre class="lang-py prettyprint-override">`` -> ``py``; no language class -> ``""``."""
    for cls in pre.get("class") or []:
        if cls.startswith("lang-") and cls != "lang-none":
            return cls[len("lang-"):]
    return ""


# The markdownify options; also what benchmarks/scrape_dump.py compares plain markdownify with.
MARKDOWN_OPTIONS = dict(
    heading_style="ATX",
    bullets="-",
    escape_underscores=False,
    escape_asterisks=False,
    escape_misc=False,
    code_language_callback=_code_language,
)
_CONVERTER = MarkdownConverter(**MARKDOWN_OPTIONS)


class _Tag(Tag):
    """A bs4 ``Tag`` that answers ``find_parent("name")`` by walking its parents directly."""

    def find_parent(self, name=None, attrs=None, **kwargs):
        if not isinstance(name, str) or attrs or kwargs:  # anything but a bare tag name
            return super().find_parent(name, attrs, **kwargs)
        parent = self.parent
        while parent is not None and parent.name != name:
            parent = parent.parent
        return parent


def html_to_markdown(html: str) -> str:
    soup = BeautifulSoup(html, "html.parser", element_classes={Tag: _Tag})
    return _BLANK_LINES.sub("\n\n", _CONVERTER.convert_soup(soup)).strip()
