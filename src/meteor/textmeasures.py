"""Word-level text measures of our own: tokens, stems, content words, identifiers, key terms.

The offline teacher's rubric (:mod:`meteor.teacher.rubric`) and guideline shaping
(:mod:`meteor.teacher.shaping`) are built on these; any stage can use them. They live apart from
:mod:`meteor.textmetrics` on purpose: that module is the ROUGE-L the evaluate stage reports, taken
from the ``rouge-score`` package with *its* tokenisation (``max_depth`` is two tokens, Porter
stems), while these measures tokenise their own way (``max_depth`` and ``torch.no_grad`` stay one
token, only a plural ``s`` is stemmed) so that code identifiers can be recognised and weighed.
Mixing the two tokenisations in one module would invite using one where the other is meant.

*Key terms* are a reference's most specific words and code identifiers, ranked by a tf-idf-like
weight computed over the reference's own sentences (frequent in the text, concentrated in few
sentences, identifiers up-weighted, words already in the question down-weighted, stop words
dropped); see :func:`key_terms`. :func:`key_term_recall` measures how much of that weight an
answer covers.

Everything is pure and deterministic: the same text always gives the same measures.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

MAX_KEY_TERMS = 8

# Words that carry no topic: English function words plus filler common in Stack Overflow answers.
STOPWORDS = frozenset("""
a about above after again against all almost also although always am among an and another any
anything are aren around as at away back be because been before being below besides best better
between both but by can cannot could couldn did didn do does doesn doing don done down during each
either else enough etc even ever every example first for from further get gets getting give given
gives go goes going good got had has hasn have having he her here hers him his how however i if
in instead into is isn it its itself just keep know last least less let like likely look lot made
make makes making many may maybe me might more most much must my need needs neither never new next
no non none nor not nothing now of off often on once one only or other others otherwise our out
over own part per perhaps please point pretty probably put quite rather really right said same say
see seem seems several shall she should shouldn show simply since so some something sometimes
still such sure take than thank thanks that the their them then there therefore these they thing
things think this those though through thus to too try trying two under unless until up upon us
use used useful uses using usually very via want wants was wasn way ways we well were weren what
whatever when where whether which while who whole whom whose why will with within without won
work works would wouldn yes yet you your yours e.g i.e vs
high higher low lower large larger small smaller big bigger become becomes became usual often
different differently important simple easy hard fine wrong clear clearly actually basically
exactly directly typically especially mean means below above instead rough roughly
""".split())

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[_.][A-Za-z0-9]+)*")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_FENCED_CODE = re.compile(r"```.*?(?:```|\Z)", re.S)
_CAMEL = re.compile(r"[a-z][A-Z]|[A-Z]{2,}[a-z]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


# ------------------------------------------------------------------------------- words
def tokens(text: str) -> list[str]:
    """Normalised word tokens: lower-cased; ``max_depth`` and ``torch.no_grad`` stay one token."""
    return [t.lower() for t in _TOKEN.findall(text)]


def stem(token: str) -> str:
    """A deliberately tiny stemmer: plural ``s`` only, and never inside identifiers or numbers."""
    if (len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is"))
            and token.isalpha()):
        return token[:-1]
    return token


def is_content(token: str) -> bool:
    return len(token) >= 3 and not token.isdigit() and token not in STOPWORDS


def content_stems(text: str) -> list[str]:
    return [stem(t) for t in tokens(text) if is_content(t)]


def is_identifier(surface: str) -> bool:
    """Looks like code: ``snake_case``, ``dotted.name``, ``camelCase`` or mixed letters and digits."""
    return ("_" in surface or "." in surface or bool(_CAMEL.search(surface))
            or (any(c.isdigit() for c in surface) and any(c.isalpha() for c in surface)))


def is_specific_number(token: str) -> bool:
    """A number that states a fact (``0.72``, ``512``), not a list or section number (``3``)."""
    return token.replace(".", "").isdigit() and len(token) >= 2


def distinct_trigram_ratio(toks: Sequence[str]) -> float:
    """Share of distinct word trigrams: 1.0 for text that never repeats itself."""
    grams = [tuple(toks[i:i + 3]) for i in range(len(toks) - 2)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------- key terms
@dataclass(frozen=True)
class KeyTerm:
    stem: str  # what is matched against an answer's stems
    surface: str  # how it is written in the reference (for hints)
    weight: float
    identifier: bool


def key_terms(reference: str, question_text: str = "", k: int = MAX_KEY_TERMS) -> list[KeyTerm]:
    """The ``k`` most specific terms of ``reference``, by a tf-idf-like weight over its sentences.

    ``tf`` counts occurrences (half weight inside fenced code, which is mostly boilerplate) and
    enters sublinearly (``1 + log tf``) so one word repeated everywhere does not crowd out the
    rest; ``idf = log(1 + sentences / sentences containing the term)``; identifiers (inline code,
    snake_case, dotted or camelCase names) weigh 1.5x; terms already in the question weigh 0.5x,
    since restating the question is not answering it. Ties break alphabetically (deterministic).
    """
    fenced = " ".join(_FENCED_CODE.findall(reference))
    prose = _FENCED_CODE.sub(" ", reference)
    inline_code = {t.lower() for span in _INLINE_CODE.findall(prose) for t in _TOKEN.findall(span)}
    question_stems = set(content_stems(question_text))

    tf: Counter = Counter()
    surface: dict[str, str] = {}
    identifier: dict[str, bool] = {}
    for text, weight in ((prose, 1.0), (fenced, 0.5)):
        for raw in _TOKEN.findall(text):
            low = raw.lower()
            if not is_content(low):
                continue
            s = stem(low)
            tf[s] += weight
            surface.setdefault(s, raw)
            identifier[s] = identifier.get(s, False) or is_identifier(raw) or low in inline_code

    sentences = [s for s in _SENTENCE_END.split(prose) if s.strip()] or [prose]
    df: Counter = Counter()
    for sentence in sentences:
        df.update(set(content_stems(sentence)))

    scored = []
    for s, count in tf.items():
        idf = math.log(1 + len(sentences) / max(df[s], 1))  # code-only terms: rarest (df 1)
        weight = ((1 + math.log(count)) * idf * (1.5 if identifier[s] else 1.0)
                  * (0.5 if s in question_stems else 1.0))
        scored.append(KeyTerm(s, surface[s], max(weight, 0.0), identifier[s]))
    scored.sort(key=lambda t: (-t.weight, t.stem))
    return scored[:k]


def key_term_recall(answer: str, terms: Sequence[KeyTerm]) -> tuple[float, list[KeyTerm]]:
    """Weighted share of ``terms`` present in ``answer``, and the missing ones (heaviest first)."""
    if not terms:
        return 1.0, []
    present = set(content_stems(answer))
    missing = [t for t in terms if t.stem not in present]
    total = sum(t.weight for t in terms)
    return 1.0 - sum(t.weight for t in missing) / total, missing
