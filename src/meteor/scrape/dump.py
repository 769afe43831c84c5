"""Stream a Stack Exchange ``Posts.xml`` in two passes with memory independent of the file size.

The dump is one ``<posts>`` element holding ~60M attribute-only ``<row .../>`` elements (~100 GB for
Stack Overflow). Questions (PostTypeId=1) name their accepted answer (PostTypeId=2, ParentId=the
question), but an answer may come before its question in the file, so one pass cannot pair them
without holding everything. Instead:

* pass 1 reads questions only and keeps small maps: the ids of the questions that pass every rule
  (candidate -> accepted answer id) and one bit per question id ever seen (to tell an orphan
  answer from an answer to a dropped question; ~10 MB for Stack Overflow's id range);
* pass 2 picks up the raw HTML of the candidates and of their accepted answers, in whichever order
  they come, and converts a pair to Markdown as soon as both halves are there.

Duplicates (same title and question up to case, whitespace and punctuation) are removed last, among
the finished records (:func:`meteor.scrape.records.drop_duplicates`): only a copy whose accepted
answer turned out usable can be kept, and of those the best.

So memory is O(kept questions) plus the id bitmap, never O(file): lines are read with a length
limit and pyexpat is fed bounded batches. Speed: dumps hold one row per line, so a pass recognises
the rows it does not need from the raw line (pass 1: answers; pass 2: everything except candidates
and their accepted answers) and never XML-parses them; HTML conversion runs for kept rows only,
and with ``workers`` > 1 it runs in a process pool while pass 2 goes on reading (see
:class:`_RecordMaker`); the records are the same either way.

A row with bad attributes (non-integer Id, missing Body, ...) is skipped and counted; a file that
is not well-formed XML at all is one error naming the file and line.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path
from xml.parsers import expat
from xml.sax.saxutils import unescape as xml_unescape

from tqdm import tqdm

from meteor.scrape import records as R
from meteor.scrape.categories import CategoryTable, parse_tags

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
# Stack Exchange post ids are 32-bit ints; the bound also caps the id bitmap at 256 MB.
MAX_POST_ID = 2**31 - 1
# Fast-path patterns on raw row lines. Inside a double-quoted attribute a '"' is always escaped,
# so these can only match real attributes, never text in a Body or Title.
_QUESTION = b' PostTypeId="1"'
_ANSWER = b' PostTypeId="2"'
_ID = re.compile(rb'\sId="(\d+)"')
_PARENT_ID = re.compile(rb'\sParentId="(\d+)"')
_TAGS = b' Tags="'
# Question/answer pairs per task sent to a conversion worker: ~30 bodies, tens of ms of work, so
# the pickling round trip is small next to it.
CONVERT_CHUNK = 16


class DumpFormatError(ValueError):
    """The input is not a well-formed Stack Exchange XML dump."""


class _IdBitmap:
    """A set of non-negative ints as one bit each (a Python set of 24M ints would take GBs)."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, i: int) -> None:
        byte = i >> 3
        if byte >= len(self._bits):  # grow geometrically: amortised O(1)
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        self._bits[byte] |= 1 << (i & 7)

    def __contains__(self, i: int) -> bool:
        byte = i >> 3
        return byte < len(self._bits) and bool(self._bits[byte] >> (i & 7) & 1)


def _parse_post_id(text: str | None) -> int:
    """An id as int; ``ValueError`` for missing, non-integer or out-of-range ids."""
    if text is None:
        raise ValueError("missing id")
    value = int(text)
    if not 0 < value <= MAX_POST_ID:
        raise ValueError(f"id out of range: {value}")
    return value


def _is_one_row(line: bytes) -> bool:
    """True for a whole line holding exactly one ``<row .../>`` (how dumps are written)."""
    return ((line.endswith(b"/>\n") or line.endswith(b"/>\r\n"))
            and line.lstrip().startswith(b"<row ")
            and line.count(b"<") == 1 and line.count(b'"') % 2 == 0)


def _stream(path: Path, on_row: Callable[[dict[str, str]], None], desc: str, chunk_size: int,
            skip: Callable[[bytes], bool]) -> None:
    """Call ``on_row`` with the attributes of each ``<row>`` of ``path`` that ``skip`` keeps.

    ``skip`` sees the raw bytes of each line that holds one whole row and may decide it without
    XML parsing (the fast path: most rows are irrelevant to a pass and cheap to recognise); every
    other line goes to expat in batches of about ``chunk_size`` bytes. A skipped line is replaced
    by a bare newline so that expat's error positions stay true file lines. Lines are read with a
    length limit, so a file without newlines is still read in bounded pieces.
    """

    def start(name: str, attrs: dict[str, str]) -> None:
        if name == "row":
            on_row(attrs)

    parser = expat.ParserCreate(encoding="utf-8")
    parser.StartElementHandler = start
    batch: list[bytes] = []
    batch_bytes = 0
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                      desc=desc, disable=None, leave=False) as bar:
        try:
            for line in iter(lambda: f.readline(chunk_size), b""):
                batch.append(b"\n" if _is_one_row(line) and skip(line) else line)
                batch_bytes += len(line)
                if batch_bytes >= chunk_size:
                    parser.Parse(b"".join(batch), False)
                    bar.update(batch_bytes)
                    batch, batch_bytes = [], 0
            parser.Parse(b"".join(batch), True)
        except expat.ExpatError as e:
            raise DumpFormatError(
                f"{path}: not a well-formed XML dump at line {e.lineno}, column {e.offset}: "
                f"{expat.ErrorString(e.code)}") from None


def resolve_workers(workers: int) -> int:
    """``workers`` as a process count: 0 means one per CPU this process may run on."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = one per CPU), got {workers}")
    if workers:
        return workers
    if hasattr(os, "sched_getaffinity"):  # honours CPU limits of containers and taskset
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _make_records(pairs: list[dict]) -> list[dict]:
    """A pool task: the records of a chunk of pairs (``make_record`` keyword arguments)."""
    return [R.make_record(**pair) for pair in pairs]


class _RecordMaker:
    """Turns question/answer pairs into records, in this process or in a pool of ``workers``.

    With a pool, pairs go out in chunks of ``CONVERT_CHUNK`` pairs and at most two chunks per
    worker are in flight; when that window is full, the oldest chunk's records are collected
    before reading on. That bounds the memory of pending work and lets reading and conversion
    overlap, and records come back in the order of submission. (``Pool.imap`` would pull its
    input on a feeder thread without any bound, i.e. run the whole pass ahead into memory.) The
    pool starts with the first full chunk, so an input with few kept rows never pays for it. Use
    as a context manager: the pool is shut down on the way out, and terminated on an error.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.chunk = CONVERT_CHUNK
        self.records: list[dict] = []
        self._pairs: list[dict] = []
        self._in_flight: deque[AsyncResult] = deque()
        self._pool: Pool | None = None

    def add(self, **pair) -> None:
        if self.workers <= 1:
            self.records.append(R.make_record(**pair))
            return
        self._pairs.append(pair)
        if len(self._pairs) >= self.chunk:
            self._send()

    def _send(self) -> None:
        if self._pool is None:
            log.info("converting HTML to Markdown in %d worker processes", self.workers)
            self._pool = Pool(self.workers)
        self._in_flight.append(self._pool.apply_async(_make_records, (self._pairs,)))
        self._pairs = []
        if len(self._in_flight) >= 2 * self.workers:
            self.records += self._in_flight.popleft().get()

    def finish(self) -> list[dict]:
        """All records, in the order their pairs were added."""
        if self._pool is None:  # never started: the few pairs are done here
            self.records += _make_records(self._pairs)
        elif self._pairs:
            self._send()
        self._pairs = []
        while self._in_flight:
            self.records += self._in_flight.popleft().get()
        return self.records

    def __enter__(self) -> _RecordMaker:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()  # all results are in; let the workers exit
            else:
                self._pool.terminate()
            self._pool.join()


def scrape_dump(
    path: str | os.PathLike,
    *,
    categories: Mapping[str, Sequence[str]],
    min_score: int = 0,
    source: str = "dump",
    chunk_size: int = CHUNK_SIZE,
    workers: int = 1,
) -> R.ScrapeResult:
    """Kept question/accepted-answer records of a ``Posts.xml`` (sorted by id) and drop counts.

    ``workers``: processes converting kept rows' HTML to Markdown (1: this one; 0: one per CPU).
    """
    path = Path(path)
    workers = resolve_workers(workers)
    if not path.is_file():
        raise FileNotFoundError(f"Stack Exchange dump not found: {path}")
    table = CategoryTable(categories)
    result = R.ScrapeResult(source=source)
    dropped = result.dropped

    # ---- pass 1: which questions to keep, and which answer each of them needs
    question_ids = _IdBitmap()
    accepted_of: dict[int, int] = {}  # candidate question id -> accepted answer id

    def pass1_skip(line: bytes) -> bool:
        """Answers wait for pass 2; off-topic questions (most of them) are decided here."""
        if _ANSWER in line:
            result.rows_read += 1
            return True
        tags_at = line.find(_TAGS)  # bytes.find: ~15x faster than a regex on a 2 KB line
        if tags_at < 0 or _QUESTION not in line or not (post_id := _ID.search(line)):
            return False
        tags_at += len(_TAGS)
        qid = int(post_id[1])
        if not 0 < qid <= MAX_POST_ID or qid in question_ids:
            return False  # the parser path counts it
        tags = line[tags_at:line.find(b'"', tags_at)].decode("utf-8", "replace")
        if table.categorize(parse_tags(xml_unescape(tags))):
            return False
        result.rows_read += 1
        question_ids.add(qid)
        dropped[R.OFF_TOPIC] += 1
        return True

    def pass1(row: dict[str, str]) -> None:
        result.rows_read += 1
        post_type = row.get("PostTypeId")
        if post_type == "2":
            return
        if post_type != "1":
            dropped[R.OTHER_POST_TYPE if post_type and post_type.isdigit() else R.MALFORMED] += 1
            return
        try:
            qid = _parse_post_id(row.get("Id"))
        except ValueError:
            dropped[R.MALFORMED] += 1
            return
        if qid in question_ids:  # the same Id twice: keep the first row only
            dropped[R.DUPLICATE] += 1
            return
        question_ids.add(qid)  # even if dropped below: its answers are then not orphans
        category = table.categorize(parse_tags(row.get("Tags")))
        if category is None:  # before any other check: rows that are not ours need not be valid
            dropped[R.OFF_TOPIC] += 1
            return
        try:
            score = int(row.get("Score", "0"))
            accepted = row.get("AcceptedAnswerId")
            accepted_id = _parse_post_id(accepted) if accepted else None
            title, body = row["Title"], row["Body"]
        except (KeyError, ValueError):
            dropped[R.MALFORMED] += 1
            return
        reason = R.question_drop_reason(
            title=title, body=body, category=category,
            has_accepted_answer=accepted_id is not None, score=score, min_score=min_score,
            closed="ClosedDate" in row, deleted="DeletionDate" in row,
        )
        if reason:
            dropped[reason] += 1
        else:
            accepted_of[qid] = accepted_id

    _stream(path, pass1, f"{path.name} pass 1/2", chunk_size, pass1_skip)
    question_of = {a: q for q, a in accepted_of.items()}  # accepted answer id -> question id
    log.info("pass 1: %d rows, %d candidate questions", result.rows_read, len(accepted_of))

    # ---- pass 2: pair candidates with their accepted answers, in whichever order they come
    waiting_questions: dict[int, dict[str, str]] = {}
    waiting_answers: dict[int, str] = {}  # question id -> accepted answer HTML

    record_maker = _RecordMaker(workers)

    def pair(qid: int) -> None:
        if qid in waiting_questions and qid in waiting_answers:
            row = waiting_questions.pop(qid)
            tags = parse_tags(row.get("Tags"))
            record_maker.add(
                question_id=qid, category=table.categorize(tags), title=row["Title"],
                question_html=row["Body"], answer_html=waiting_answers.pop(qid), tags=tags,
                score=int(row.get("Score", "0")),
            )

    def is_needed_answer(aid: int, parent: int) -> bool:
        """Counts orphan and unused answers; True for the accepted answer of a candidate."""
        if parent not in question_ids:
            dropped[R.ANSWER_ORPHAN] += 1
        elif question_of.get(aid) != parent:
            result.unused_answers += 1
        else:
            return True
        return False

    def pass2_skip(line: bytes) -> bool:
        """Decide from the raw line when the row is certainly not needed (no XML parsing)."""
        post_id = _ID.search(line)
        if post_id is None:
            return False  # let the parser see it (and count it if malformed)
        if _QUESTION in line:
            return int(post_id[1]) not in accepted_of
        if _ANSWER in line and (parent := _PARENT_ID.search(line)):
            aid, parent_id = int(post_id[1]), int(parent[1])
            if 0 < aid <= MAX_POST_ID and 0 < parent_id <= MAX_POST_ID:
                return not is_needed_answer(aid, parent_id)
        return False

    def pass2(row: dict[str, str]) -> None:
        post_type = row.get("PostTypeId")
        if post_type == "1":
            try:
                qid = _parse_post_id(row.get("Id"))
            except ValueError:
                return  # counted in pass 1
            if accepted_of.pop(qid, None) is not None:  # pop: a repeated Id is taken once
                waiting_questions[qid] = row
                pair(qid)
        elif post_type == "2":
            try:
                aid = _parse_post_id(row.get("Id"))
                parent = _parse_post_id(row.get("ParentId"))
            except ValueError:
                dropped[R.ANSWER_MALFORMED] += 1
                return
            if not is_needed_answer(aid, parent):
                return
            if "Body" not in row:
                dropped[R.ANSWER_MALFORMED] += 1
            elif reason := R.answer_drop_reason(row["Body"]):
                dropped[reason] += 1
            else:
                del question_of[aid]
                waiting_answers[parent] = row["Body"]
                pair(parent)

    with record_maker:
        _stream(path, pass2, f"{path.name} pass 2/2", chunk_size, pass2_skip)
        result.records = R.drop_duplicates(record_maker.finish(), dropped)
    # Candidates whose accepted answer never arrived (absent, or dropped above).
    if unanswered := len(waiting_questions) + len(accepted_of):
        dropped[R.NO_USABLE_ANSWER] += unanswered
    result.records.sort(key=lambda r: r["id"])
    return result
