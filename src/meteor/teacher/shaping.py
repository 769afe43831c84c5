"""The offline teacher's answer: the reference answer regrouped under a guideline's points.

The offline teacher cannot write new text, so its "detailed answer following a guideline" is the
accepted Stack Overflow answer reorganised (:func:`shape_by_guideline`). Given a guideline with
numbered points (:func:`guideline_points`), the reference's paragraphs (each with the code blocks
and lists that follow it) are regrouped under the guideline's points by word overlap, after a
short "approach" preface listing the points; a closing summary stays last; points the reference
does not address are named at the end instead of being filled with invented text. Without a
guideline (or one without numbered points) the reference is returned unchanged.

Word overlap uses the content stems of :mod:`meteor.textmeasures`. Deterministic: the same
reference and guideline always give the same text.
"""

from __future__ import annotations

import re
from collections import Counter

from meteor.textmeasures import content_stems

HEADING_CHARS = 80

_NUMBERED = re.compile(r"^\s*(?:[-*]\s*)?\(?(\d{1,2})[.):]\s+(.+?)\s*$")
_MARKDOWN_NOISE = re.compile(r"[*_`#>]+")
_CONCLUSION = re.compile(r"^\W*(?:summary|in summary|in short|tl;?dr|to sum up|bottom line)\b", re.I)


def guideline_points(guideline: str) -> list[str]:
    """The numbered points of a guideline (``1. ...``, ``2) ...``), markdown stripped."""
    points = []
    for line in guideline.splitlines():
        m = _NUMBERED.match(line)
        if m:
            text = " ".join(_MARKDOWN_NOISE.sub("", m.group(2)).split()).rstrip(":")
            if text:
                points.append(text)
    return points


def _units(reference: str) -> list[str]:
    """Paragraphs of the reference, each with the code blocks (and lists) that follow it.

    Blank lines inside fenced code do not split it.
    """
    blocks: list[str] = []
    current: list[str] = []
    in_fence = False
    for line in reference.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if current:
                blocks.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))

    units: list[str] = []
    for block in blocks:
        first = block.lstrip()
        attaches = first.startswith(("```", "    ", "- ", "* ", "|")) or bool(re.match(r"\d+\. ", first))
        if units and attaches:  # code or a list belongs with the paragraph that introduces it
            units[-1] += "\n\n" + block
        else:
            units.append(block)
    return units


def _heading(point: str) -> str:
    if len(point) <= HEADING_CHARS:
        return point
    return point[:HEADING_CHARS].rsplit(" ", 1)[0] + " ..."


def shape_by_guideline(reference: str, guideline: str | None) -> str:
    """The reference regrouped under the guideline's numbered points (see the module docstring)."""
    points = guideline_points(guideline) if guideline else []
    units = _units(reference.strip())
    if not points or not units:
        return reference.strip()

    # A closing summary stays last instead of being filed under one of the points.
    closing = [k for k, u in enumerate(units) if k > 0 and _CONCLUSION.match(u)]
    conclusion = [units[k] for k in closing]
    units = [u for k, u in enumerate(units) if k not in closing]

    # Shared words weigh 1 / (paragraphs containing them): a word found in every paragraph
    # ("model") says nothing about where a paragraph belongs; a rare one ("pitfall") does.
    unit_stems = [set(content_stems(u)) for u in units]
    unit_df = Counter(s for stems in unit_stems for s in stems)
    point_stems = [set(content_stems(p)) for p in points]
    assigned: list[int] = []
    for stems in unit_stems:
        overlaps = [sum(1 / unit_df[s] for s in stems & ps) for ps in point_stems]
        best = max(range(len(points)), key=lambda i: (overlaps[i], -i))
        if overlaps[best] == 0:  # no shared word: stay with the previous paragraph's point
            best = assigned[-1] if assigned else 0
        assigned.append(best)

    used = sorted(set(assigned))
    preface = ("**Approach.** A precise answer needs: "
               + "; ".join(f"({i + 1}) {p[0].lower() + p[1:]}" for i, p in enumerate(points))
               + ". I take these points in order.")
    sections = [preface]
    for i in used:
        body = "\n\n".join(u for u, a in zip(units, assigned) if a == i)
        sections.append(f"### {i + 1}. {_heading(points[i])}\n\n{body}")
    sections += conclusion
    uncovered = [str(i + 1) for i in range(len(points)) if i not in used]
    if uncovered:
        sections.append(f"_Guideline point(s) {', '.join(uncovered)} are not addressed here._")
    return "\n\n".join(sections)
