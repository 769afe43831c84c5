"""What the dump and API sources share: the record schema, the keep/drop rules, de-duplication.

A record is one kept question with its accepted answer::

    {"id": 123, "category": "ML", "title": ..., "question": markdown, "answer": markdown,
     "tags": [...], "score": 5, "link": "https://stackoverflow.com/q/123"}

Rows that are not kept are counted by reason (the constants below), never silently lost.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

from meteor.scrape.html import html_to_markdown

# Drop reasons of question rows, in the order the rules are checked. Off-topic comes first: rows
# that are not ours are not inspected any further (that is also what makes the dump pass fast).
OFF_TOPIC = "off_topic"  # no tag of the category table
MALFORMED = "malformed"  # non-integer Id/Score/..., or a missing Title/Body
DELETED = "deleted"
CLOSED = "closed"
NO_ACCEPTED_ANSWER = "no_accepted_answer"
LOW_SCORE = "low_score"
EMPTY_BODY = "empty_body"
BAD_CHARACTERS = "bad_characters"
DUPLICATE = "duplicate"  # same title and body as a better kept copy (see drop_duplicates)
NO_USABLE_ANSWER = "no_usable_answer"  # the accepted answer is absent or was itself dropped
# Drop reasons of answer rows (only accepted answers are validated in full).
ANSWER_MALFORMED = "answer_malformed"
ANSWER_ORPHAN = "answer_orphan"  # its question is not in the input at all
ANSWER_EMPTY_BODY = "answer_empty_body"
ANSWER_BAD_CHARACTERS = "answer_bad_characters"
OTHER_POST_TYPE = "other_post_type"  # tag wikis, moderator nominations, ...

# Characters that are legal in XML but never belong in a post: C0/C1 control characters (other than
# tab and newlines), DEL and Unicode noncharacters. They signal a broken export or binary junk.
_BAD_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff]")
_HTML_TAG = re.compile(r"<[^>]*>")
_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")  # whitespace, punctuation, Markdown syntax


def has_bad_characters(*texts: str) -> bool:
    return any(_BAD_CHARACTERS.search(t) for t in texts)


def is_empty_html(html: str) -> bool:
    """True when the body has no text outside its tags (cheap: no HTML parsing)."""
    return not _HTML_TAG.sub("", html).strip()


def question_drop_reason(
    *,
    title: str,
    body: str,
    category: str | None,
    has_accepted_answer: bool,
    score: int,
    min_score: int,
    closed: bool = False,
    deleted: bool = False,
) -> str | None:
    """Why a well-formed question is dropped, or ``None`` to keep it (duplicates checked apart)."""
    if category is None:
        return OFF_TOPIC
    if deleted:
        return DELETED
    if closed:
        return CLOSED
    if not has_accepted_answer:
        return NO_ACCEPTED_ANSWER
    if score < min_score:
        return LOW_SCORE
    if is_empty_html(body) or not title.strip():
        return EMPTY_BODY
    if has_bad_characters(title, body):
        return BAD_CHARACTERS
    return None


def answer_drop_reason(body: str) -> str | None:
    if is_empty_html(body):
        return ANSWER_EMPTY_BODY
    if has_bad_characters(body):
        return ANSWER_BAD_CHARACTERS
    return None


def duplicate_key(title: str, text: str) -> bytes:
    """A 16-byte digest of a question's letters and digits, case-folded: two questions that differ
    only in whitespace, punctuation or case (or Markdown syntax, which is punctuation) share it."""
    title, text = (_NOT_ALPHANUMERIC.sub("", t.casefold()) for t in (title, text))
    return hashlib.blake2b(f"{title}\0{text}".encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def drop_duplicates(records: list[dict], dropped: Counter) -> list[dict]:
    """One record per :func:`duplicate_key` of title + question, in the order given.

    Runs on finished records, i.e. after the accepted answer was found usable, so a copy whose
    answer is missing or junk never takes the place of one whose answer is good. The copy kept is
    the best: the highest question score, then the lowest id (the older post). That depends on
    the copies alone, not on the order a dump or the API delivers them. Each other copy counts as
    :data:`DUPLICATE`.
    """
    best: dict[bytes, dict] = {}
    for record in records:
        key = duplicate_key(record["title"], record["question"])
        kept = best.get(key)
        if kept is None or (record["score"], -record["id"]) > (kept["score"], -kept["id"]):
            best[key] = record
    if len(best) < len(records):
        dropped[DUPLICATE] += len(records) - len(best)
        chosen = {id(r) for r in best.values()}
        records = [r for r in records if id(r) in chosen]
    return records


def question_link(question_id: int) -> str:
    return f"https://stackoverflow.com/q/{question_id}"


def make_record(
    *,
    question_id: int,
    category: str,
    title: str,
    question_html: str,
    answer_html: str,
    tags: list[str],
    score: int,
    link: str | None = None,
) -> dict:
    """Build a record; the only place where HTML is converted, so only kept rows pay for it."""
    return {
        "id": question_id,
        "category": category,
        "title": title.strip(),
        "question": html_to_markdown(question_html),
        "answer": html_to_markdown(answer_html),
        "tags": tags,
        "score": score,
        "link": link or question_link(question_id),
    }


@dataclass
class ScrapeResult:
    """Kept records (sorted by id) and the rows that were not kept, by reason."""

    source: str
    records: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    rows_read: int = 0  # dump rows or API items
    # Answers that are neither accepted answers of kept questions nor drop-worthy: not an error.
    unused_answers: int = 0
