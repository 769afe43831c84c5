"""Tags -> one of the categories (ML, DL, NLP, CV) by the configurable table ``scrape.categories``.

Stack Exchange dumps use two tag encodings: ``<machine-learning><python>`` (older dumps) and
``|machine-learning|python|`` (newer ones); the API returns a list. All three parse here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

_ANGLE_TAG = re.compile(r"<([^<>]+)>")


def parse_tags(raw: str | Sequence[str] | None) -> list[str]:
    """Tags in the order given, lower-cased; ``None`` or an empty string gives ``[]``."""
    if raw is None:
        return []
    if not isinstance(raw, str):
        return [t.strip().lower() for t in raw if t and t.strip()]
    raw = raw.strip()
    if raw.startswith("<"):
        tags = _ANGLE_TAG.findall(raw)
    elif "|" in raw:
        tags = raw.split("|")
    else:  # a single bare tag or space-separated tags (some third-party exports)
        tags = raw.split()
    return [t.strip().lower() for t in tags if t.strip()]


class CategoryTable:
    """A question takes the first category, in table order, that lists one of its tags."""

    def __init__(self, table: Mapping[str, Iterable[str]]):
        self.names = list(table)
        # tag -> index of the first category listing it; min() over a question's tags then gives
        # the first matching category in table order with one dict lookup per tag.
        self._rank: dict[str, int] = {}
        for rank, name in enumerate(self.names):
            for tag in table[name]:
                self._rank.setdefault(tag.lower(), rank)

    def categorize(self, tags: Iterable[str]) -> str | None:
        """The category of a question with these tags, or ``None`` when no tag is in the table."""
        ranks = [self._rank[t] for t in tags if t in self._rank]
        return self.names[min(ranks)] if ranks else None

    @property
    def tags(self) -> dict[str, str]:
        """Every tag in the table with its category (used to query the API per tag)."""
        return {tag: self.names[rank] for tag, rank in self._rank.items()}
