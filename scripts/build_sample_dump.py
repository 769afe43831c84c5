"""Build the bundled sample dump data/raw/Posts.xml from the authored Q&A in data/raw/authored/.

Each authored file (ml, dl, nlp, cv .yaml) is a YAML list of
``{title, tags, score, answer_score, question: HTML, answer: HTML}``. The output is a Stack Exchange
``Posts.xml``: questions (PostTypeId=1) with AcceptedAnswerId, accepted answers (PostTypeId=2) with
ParentId, and the quirks of real dumps: both tag encodings (``<a><b>`` and ``|a|b|``), extra
non-accepted answers that outscore the accepted one, and answers written before their question.
Distractors the scraper must drop and count by reason are appended (ids from 900000).

Deterministic: ids come from (file, position in file), so appending entries never renumbers others,
and the same inputs give byte-identical output.

Run: python scripts/build_sample_dump.py [--authored data/raw/authored] [--out data/raw/Posts.xml]
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime, timedelta
from pathlib import Path
from xml.sax.saxutils import escape

import yaml

from meteor.io import atomic_path
from meteor.utils import setup_logging

log = logging.getLogger("build_sample_dump")

AUTHORED_FILES = ("ml", "dl", "nlp", "cv")
REQUIRED_KEYS = ("title", "tags", "score", "answer_score", "question", "answer")
ID_BLOCK = 100_000  # file k's questions get ids (k + 1) * ID_BLOCK + 10 * position
DISTRACTOR_BASE = 900_000
# Attribute escaping as in real dumps: newlines become character references, not raw newlines
# (which an XML parser would normalise to spaces).
ATTR_ENTITIES = {'"': "&quot;", "\n": "&#xA;", "\r": "&#xD;", "\t": "&#x9;"}
EPOCH = datetime(2016, 1, 4, 9, 0, 0)


def row(**attrs: object) -> str:
    fields = " ".join(f'{k}="{escape(str(v), ATTR_ENTITIES)}"'
                      for k, v in attrs.items() if v is not None)
    return f"  <row {fields} />"


def encode_tags(tags: list[str], angle_brackets: bool) -> str:
    return "".join(f"<{t}>" for t in tags) if angle_brackets else "|" + "|".join(tags) + "|"


def created(post_id: int) -> str:
    return (EPOCH + timedelta(minutes=7 * (post_id % ID_BLOCK) + post_id // ID_BLOCK)).isoformat(
        timespec="milliseconds")


def question_row(qid: int, title: str, body: str, tags: list[str], *, score: int = 5,
                 accepted: int | None = None, answers: int = 1, angle: bool = True,
                 **extra: object) -> str:
    return row(Id=qid, PostTypeId=1, AcceptedAnswerId=accepted, CreationDate=created(qid),
               Score=score, ViewCount=40 * score + 17, Body=body, OwnerUserId=qid % 9973 + 1,
               Title=title, Tags=encode_tags(tags, angle), AnswerCount=answers, CommentCount=0,
               ContentLicense="CC BY-SA 4.0", **extra)


def answer_row(aid: int, parent: int, body: str, *, score: int = 3, **extra: object) -> str:
    return row(Id=aid, PostTypeId=2, ParentId=parent, CreationDate=created(aid), Score=score,
               Body=body, OwnerUserId=aid % 7919 + 1, CommentCount=0,
               ContentLicense="CC BY-SA 4.0", **extra)


def load_authored(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"authored Q&A file not found: {path}")
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a YAML list of Q&A entries")
    for i, entry in enumerate(entries):
        missing = [k for k in REQUIRED_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {missing}")
    return entries


def authored_rows(entries: list[dict], file_index: int) -> list[str]:
    rows = []
    for i, e in enumerate(entries):
        qid = (file_index + 1) * ID_BLOCK + 10 * i
        has_extra = i % 3 == 0
        question = question_row(qid, e["title"], e["question"], e["tags"], score=e["score"],
                                accepted=qid + 1, answers=2 if has_extra else 1, angle=i % 2 == 0)
        answer = answer_row(qid + 1, qid, e["answer"], score=e["answer_score"])
        # Every 7th pair is written answer-first, as happens when a dump is not in id order.
        group = [answer, question] if i % 7 == 3 else [question, answer]
        if has_extra:  # outscores the accepted answer: the scraper must follow AcceptedAnswerId
            group.append(answer_row(
                qid + 2, qid, score=e["answer_score"] + 5,
                body=f"<p>Same problem here. Upgrading <code>{e['tags'][0]}</code> and restarting "
                     "the kernel fixed it for me.</p>"))
        rows += group
    return rows


def distractor_rows(template: dict) -> list[str]:
    """Rows the scraper must drop; the comment on each names the drop reason it must count."""
    on_topic = ["machine-learning", "python"]
    body = "<p>My model does not converge. What should I check first?</p>"
    answer = "<p>Scale your features and lower the learning rate.</p>"
    ids = iter(range(DISTRACTOR_BASE, DISTRACTOR_BASE + 1000, 10))
    rows = []

    qid = next(ids)  # no_accepted_answer (answered, nothing accepted)
    rows += [question_row(qid, "Why does my model not converge?", body, on_topic),
             answer_row(qid + 1, qid, answer)]
    qid = next(ids)  # off_topic, angle-bracket tags
    rows += [question_row(qid, "How do I center a div?", "<p>Centering in <code>css</code>?</p>",
                          ["css", "html"], accepted=qid + 1),
             answer_row(qid + 1, qid, "<p>Use <code>display: flex</code>.</p>")]
    qid = next(ids)  # off_topic, pipe tags
    rows += [question_row(qid, "Why is this undefined in my callback?", "<p>JS scoping issue.</p>",
                          ["javascript", "node.js"], accepted=qid + 1, angle=False),
             answer_row(qid + 1, qid, "<p>Use an arrow function.</p>")]
    qid = next(ids)  # closed
    rows += [question_row(qid, "Best deep learning framework?", "<p>Which one is best?</p>",
                          ["deep-learning", "pytorch"], accepted=qid + 1,
                          ClosedDate=created(qid + 5)),
             answer_row(qid + 1, qid, "<p>It depends.</p>")]
    qid = next(ids)  # empty_body
    rows += [question_row(qid, "Tokenizer question", "", ["nlp"], accepted=qid + 1),
             answer_row(qid + 1, qid, "<p>Please add details.</p>")]
    qid = next(ids)  # duplicate: the first authored question again under a new id
    rows += [question_row(qid, template["title"], template["question"], template["tags"],
                          accepted=qid + 1, angle=False),
             answer_row(qid + 1, qid, template["answer"])]
    qid = next(ids)  # answer_orphan: its question (qid) is not in the file
    rows += [answer_row(qid + 1, qid, answer)]
    qid = next(ids)  # malformed: non-integer Id
    rows += [question_row(qid, "Malformed id", body, on_topic, accepted=qid + 1).replace(
        f'Id="{qid}"', f'Id="q{qid}"', 1)]
    qid = next(ids)  # malformed: no Body attribute
    rows += [question_row(qid, "Missing body", body, on_topic, accepted=qid + 1).replace(
        f' Body="{escape(body, ATTR_ENTITIES)}"', "", 1), answer_row(qid + 1, qid, answer)]
    qid = next(ids)  # bad_characters: C1 control characters (ANSI colour codes pasted badly)
    rows += [question_row(qid, "Colored training log is garbled",
                          "<p>My log shows \x9b31mERROR\x9b0m: loss is nan</p>",
                          ["keras"], accepted=qid + 1),
             answer_row(qid + 1, qid, answer)]
    qid = next(ids)  # deleted
    rows += [question_row(qid, "Deleted question about OpenCV", "<p>nvm, solved</p>", ["opencv"],
                          accepted=qid + 1, DeletionDate=created(qid + 3)),
             answer_row(qid + 1, qid, answer)]
    qid = next(ids)  # low_score (below scrape.min_score = 0)
    rows += [question_row(qid, "plz send code for face detection", "<p>urgent!!!</p>",
                          ["computer-vision"], score=-4, accepted=qid + 1),
             answer_row(qid + 1, qid, answer)]
    qid = next(ids)  # no_usable_answer: the accepted answer's row is absent
    rows += [question_row(qid, "Where did the accepted answer go?", body, ["scikit-learn"],
                          accepted=qid + 1)]
    qid = next(ids)  # no_usable_answer + answer_bad_characters: the accepted answer is junk
    rows += [question_row(qid, "Why does spaCy split my entity?", "<p>My entity gets split.</p>",
                          ["spacy"], accepted=qid + 1),
             answer_row(qid + 1, qid, "<p>Try this: \x80\x81\x9f</p>")]
    qid = next(ids)  # answer_malformed: non-integer ParentId
    rows += [answer_row(qid + 1, qid, answer).replace(f'ParentId="{qid}"', 'ParentId="none"', 1)]
    qid = next(ids)  # other_post_type: a tag wiki excerpt
    rows += [row(Id=qid, PostTypeId=4, CreationDate=created(qid), Score=0,
                 Body="<p>Machine learning is a field of AI.</p>", ContentLicense="CC BY-SA 4.0")]
    return rows


def build(authored_dir: Path, out: Path) -> None:
    entries = [load_authored(authored_dir / f"{name}.yaml") for name in AUTHORED_FILES]
    rows = [r for k, file_entries in enumerate(entries) for r in authored_rows(file_entries, k)]
    rows += distractor_rows(entries[0][0])
    with atomic_path(out) as tmp:
        tmp.write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(rows)
                       + "\n</posts>\n", encoding="utf-8")
    log.info("wrote %s: %d authored questions (%s), %d rows in all", out,
             sum(map(len, entries)),
             ", ".join(f"{n}={len(e)}" for n, e in zip(AUTHORED_FILES, entries)), len(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authored", type=Path, default=Path("data/raw/authored"))
    ap.add_argument("--out", type=Path, default=Path("data/raw/Posts.xml"))
    args = ap.parse_args()
    setup_logging()
    build(args.authored, args.out)


if __name__ == "__main__":
    main()
