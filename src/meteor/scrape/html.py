"""Stack Exchange HTML bodies -> Markdown.

Code blocks (``<pre><code>``) become fenced blocks with the language from Stack Overflow's
``lang-xx`` class when present, inline ``<code>`` becomes backticks and entities are decoded.
Markdown escaping of ``_`` and ``*`` is turned off: bodies are model training text, and identifiers
like ``max_len`` must stay readable.

Code is kept exactly as written (only the newlines at its two ends are trimmed): runs of blank
lines are collapsed to one in prose only, never inside a fence (PEP 8's two blank lines between
functions stay two), and a block whose code itself contains a run of backticks gets a fence one
backtick longer than that run, so the fence cannot close early.

Conversion is the costly part of reading a dump (a few ms per body), so it avoids two overheads of
a fresh converter per call (what ``markdownify(html)`` does) while giving the same output: the
converter (whose options and per-tag function cache markdownify rebuilds on every call) is built
once, and the soup is built
with a ``Tag`` whose ``find_parent`` is a plain walk up the tree (markdownify asks every tag for
its ``<pre>`` ancestor, and bs4's generic search machinery made that ~15% of the time). bs4's
``lxml`` parser was measured too: slower than ``html.parser`` here (bs4's tree building, not the
tokenizer, dominates), so it is not used.
"""

from __future__ import annotations

import re

from bs4 import BeautifulSoup, Tag
from markdownify import MarkdownConverter, strip_pre

_BACKTICK_RUN = re.compile(r"`+")
# A fence line: optionally indented (code in a list item) or quoted; group 1 is the fence.
_FENCE_LINE = re.compile(r"^[ \t>]*(`{3,})")


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


def code_fence(code: str) -> str:
    """Backticks one longer than the longest run in ``code``, at least three (CommonMark: a fence
    closes only on a run at least as long as the one that opened it)."""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(code)), default=0)
    return "`" * max(3, longest + 1)


class FencedCodeConverter(MarkdownConverter):
    """markdownify with code blocks whose fence is always longer than any backtick run inside."""

    def convert_pre(self, el, text, parent_tags):
        if not text:
            return ""
        callback = self.options["code_language_callback"]
        language = (callback(el) if callback else "") or self.options["code_language"]
        code = strip_pre(text)  # the newlines at both ends only, as markdownify's default does
        fence = code_fence(code)
        return f"\n\n{fence}{language}\n{code}\n{fence}\n\n"


def collapse_blank_lines(markdown: str) -> str:
    """Runs of empty lines become one, outside fenced code only; code lines are kept as they are."""
    out: list[str] = []
    fence = ""  # the fence of the code block we are in, "" in prose
    for line in markdown.split("\n"):
        m = _FENCE_LINE.match(line)
        if fence:
            if m and len(m[1]) >= len(fence) and not line[m.end():].strip():
                fence = ""  # the closing fence
        elif m and "`" not in line[m.end():]:  # an opening fence (an info string has no backtick)
            fence = m[1]
        elif not line and out and not out[-1]:
            continue  # a second empty line in a row, in prose
        out.append(line)
    return "\n".join(out)


_CONVERTER = FencedCodeConverter(**MARKDOWN_OPTIONS)


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
    return collapse_blank_lines(_CONVERTER.convert_soup(soup)).strip()
