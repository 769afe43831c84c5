"""The scrape stage: tags, HTML -> Markdown, the streamed dump parser, drop reasons, the split."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing.pool
import os
import runpy
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from meteor.scrape.config import ScrapeParams
from meteor.scrape import run_scrape, split_records
from meteor.scrape.categories import CategoryTable, parse_tags
from meteor.scrape import dump
from meteor.scrape.dump import DumpFormatError, resolve_workers, scrape_dump
from meteor.scrape.html import html_to_markdown
from meteor.scrape.records import duplicate_key
from meteor.scrape.split import assign_split

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ScrapeParams().categories
AUTHORED_PER_FILE = 6

_spec = importlib.util.spec_from_file_location("build_sample_dump",
                                               ROOT / "scripts/build_sample_dump.py")
builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(builder)


def write_dump(path: Path, rows: list[str]) -> Path:
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(rows)
                    + "\n</posts>\n", encoding="utf-8")
    return path


def good_pair(qid: int, tags=("pytorch",), answer_first: bool = False) -> list[str]:
    q = builder.question_row(qid, f"Question {qid}", f"<p>Body of {qid}</p>", list(tags),
                             accepted=qid + 1)
    a = builder.answer_row(qid + 1, qid, f"<p>Answer to {qid}</p>")
    return [a, q] if answer_first else [q, a]


@pytest.fixture
def authored_dir(tmp_path):
    """Four small authored files in the format the sample-dump builder reads."""
    tag = {"ml": "scikit-learn", "dl": "pytorch", "nlp": "nltk", "cv": "opencv"}
    for name in builder.AUTHORED_FILES:
        entries = [{
            "title": f"{name} question {i}: why does fit_{i} fail?",
            "tags": [tag[name], "python"],
            "score": i,
            "answer_score": i + 1,
            "question": f"<p>Calling <code>fit_{i}(x)</code> fails &amp; prints:</p>\n"
                        f"<pre><code>ValueError: a &lt; b\n</code></pre>\n",
            "answer": f"<p>The accepted answer for {name} {i}.</p>",
        } for i in range(AUTHORED_PER_FILE)]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(entries), encoding="utf-8")
    return tmp_path


@pytest.fixture
def sample_dump(tmp_path, authored_dir):
    out = tmp_path / "Posts.xml"
    builder.build(authored_dir, out)
    return out


# ----------------------------------------------------------------------------------- tags
def test_both_tag_encodings_parse_to_the_same_tags():
    assert parse_tags("<machine-learning><python>") == ["machine-learning", "python"]
    assert parse_tags("|machine-learning|python|") == ["machine-learning", "python"]
    assert parse_tags(["Machine-Learning", "python"]) == ["machine-learning", "python"]
    assert parse_tags("<c++><c#>") == ["c++", "c#"]
    assert parse_tags("") == [] and parse_tags(None) == []


def test_category_is_the_first_in_table_order_that_matches():
    table = CategoryTable(CATEGORIES)
    assert table.categorize(["pytorch", "machine-learning"]) == "ML"  # ML comes before DL
    assert table.categorize(["opencv", "nltk"]) == "NLP"
    assert table.categorize(["javascript", "css"]) is None
    reordered = CategoryTable({"CV": CATEGORIES["CV"], "NLP": CATEGORIES["NLP"]})
    assert reordered.categorize(["opencv", "nltk"]) == "CV"


# ----------------------------------------------------------------------------------- html
PEP8_CODE = ("import os\n\n\ndef f():\n    return 1\n\n\n\nclass A:\n    pass\n\n\n"
             'x = """\n\n\n"""')


def test_code_blocks_are_byte_exact_and_only_prose_blank_lines_collapse():
    code = PEP8_CODE
    html = (f'<p>Before</p><p></p><br><p></p><p>between</p><pre class="lang-py"><code>{code}\n'
            f'</code></pre><ul><li><p>step</p><pre><code>{code}</code></pre></li></ul>'
            f'<blockquote><pre><code>{code}</code></pre></blockquote><p>after</p>')
    md = html_to_markdown(html)
    assert md.startswith("Before\n\n")
    assert "between\n\n```py\n" + code + "\n```\n\n" in md
    # In a list item every code line with text is indented; its blank lines stay blank and stay.
    indented = "\n".join(("  " + line) if line else "" for line in code.split("\n"))
    assert "- step\n\n  ```\n" + indented + "\n  ```" in md
    quoted = "\n".join(("> " + line) if line else ">" for line in code.split("\n"))
    assert "> ```\n" + quoted + "\n> ```" in md
    assert md.endswith("```\n\nafter")
    prose = md.replace(code, "").replace(indented, "").replace(quoted, "")
    assert "\n\n\n" not in prose  # outside code, a run of blank lines is one


def test_code_containing_backtick_fences_gets_a_longer_fence():
    code = "Write:\n```python\nprint(1)\n```\nor ````` even `````."
    md = html_to_markdown(f'<p>Docs:</p><pre class="lang-md"><code>{code}</code></pre><p>End.</p>')
    assert md == f"Docs:\n\n``````md\n{code}\n``````\n\nEnd."
    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt().parse(md)  # CommonMark sees one block holding all the code
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1 and fences[0].content == code + "\n" and fences[0].info == "md"
    assert html_to_markdown("<pre><code>plain</code></pre>") == "```\nplain\n```"


def test_html_to_markdown_keeps_code_blocks_inline_code_and_decodes_entities():
    html = ('<p>Call <code>model.fit(x_train)</code> &amp; check <em>shape</em> &lt; 3.</p>\n'
            '<pre class="lang-py prettyprint-override"><code>if a &lt; b and c &gt; d:\n'
            '    print(&quot;max_len&quot;)\n</code></pre>\n<ul><li>one</li><li>two</li></ul>')
    md = html_to_markdown(html)
    assert "Call `model.fit(x_train)` & check *shape* < 3." in md
    assert '```py\nif a < b and c > d:\n    print("max_len")\n```' in md
    assert "- one\n- two" in md
    assert "&amp;" not in md and "<code>" not in md


# ----------------------------------------------------------------------------- the sample
def test_sample_dump_keeps_every_authored_question_and_drops_each_distractor(sample_dump,
                                                                             authored_dir):
    result = scrape_dump(sample_dump, categories=CATEGORIES, source="sample")

    assert dict(result.dropped) == {
        "no_accepted_answer": 1, "off_topic": 2, "closed": 1, "empty_body": 1, "duplicate": 1,
        "answer_orphan": 1, "malformed": 2, "bad_characters": 1, "deleted": 1, "low_score": 1,
        "no_usable_answer": 2, "answer_bad_characters": 1, "answer_malformed": 1,
        "other_post_type": 1,
    }
    assert len(result.records) == 4 * AUTHORED_PER_FILE
    assert Counter(r["category"] for r in result.records) == dict.fromkeys(
        ["ML", "DL", "NLP", "CV"], AUTHORED_PER_FILE)
    ids = [r["id"] for r in result.records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # The accepted answer is paired even where an extra answer outscores it or comes first.
    by_title = {r["title"]: r for r in result.records}
    for name in builder.AUTHORED_FILES:
        for entry in yaml.safe_load((authored_dir / f"{name}.yaml").read_text()):
            record = by_title[entry["title"]]
            assert record["answer"] == html_to_markdown(entry["answer"])
            assert "```\nValueError: a < b\n```" in record["question"]
            assert record["link"] == f"https://stackoverflow.com/q/{record['id']}"


def test_builder_writes_both_tag_encodings_answers_first_and_is_deterministic(
        sample_dump, authored_dir, tmp_path):
    text = sample_dump.read_text()
    assert 'Tags="&lt;scikit-learn&gt;&lt;python&gt;"' in text
    assert 'Tags="|scikit-learn|python|"' in text
    # Entry 3 of each file is written answer-first.
    assert text.index('Id="100031" PostTypeId="2"') < text.index('Id="100030" PostTypeId="1"')
    again = tmp_path / "again.xml"
    builder.build(authored_dir, again)
    assert again.read_bytes() == sample_dump.read_bytes()


@pytest.mark.parametrize("reason, rows", [
    ("no_accepted_answer", [builder.question_row(50, "T", "<p>B</p>", ["nlp"])]),
    ("off_topic", [builder.question_row(50, "T", "<p>B</p>", ["css"], accepted=51),
                   builder.answer_row(51, 50, "<p>A</p>")]),
    ("closed", [builder.question_row(50, "T", "<p>B</p>", ["nlp"], accepted=51,
                                     ClosedDate="2020-01-01T00:00:00.000"),
                builder.answer_row(51, 50, "<p>A</p>")]),
    ("deleted", [builder.question_row(50, "T", "<p>B</p>", ["nlp"], accepted=51,
                                      DeletionDate="2020-01-01T00:00:00.000"),
                 builder.answer_row(51, 50, "<p>A</p>")]),
    ("empty_body", [builder.question_row(50, "T", "<p> </p>", ["nlp"], accepted=51),
                    builder.answer_row(51, 50, "<p>A</p>")]),
    ("low_score", [builder.question_row(50, "T", "<p>B</p>", ["nlp"], score=-1, accepted=51),
                   builder.answer_row(51, 50, "<p>A</p>")]),
    ("bad_characters", [builder.question_row(50, "T\x9b", "<p>B</p>", ["nlp"], accepted=51),
                        builder.answer_row(51, 50, "<p>A</p>")]),
    ("malformed", ['<row Id="x50" PostTypeId="1" Title="T" Body="B" Tags="|nlp|" />']),
    ("malformed", ['<row Id="50" PostTypeId="1" Title="T" Tags="|nlp|" AcceptedAnswerId="51" />',
                   builder.answer_row(51, 50, "<p>A</p>")]),
    ("malformed", ['<row Id="50" PostTypeId="1" Title="T" Body="B" Score="many" Tags="|nlp|" />']),
    ("off_topic", ['<row Id="50" PostTypeId="1" Title="T" Score="many" Tags="|css|" />']),
    # The kept question 1000 again: under a later id (answered, same score: the older post is
    # kept), also with other whitespace, punctuation and case; then under its own id.
    ("duplicate", [builder.question_row(1060, "Question 1000", "<p>Body of 1000</p>", ["nlp"],
                                        accepted=1061), builder.answer_row(1061, 1060, "<p>A</p>")]),
    ("duplicate", [builder.question_row(1060, "question  1000?", "<p>Body  of 1000.</p>\n",
                                        ["nlp"], accepted=1061),
                   builder.answer_row(1061, 1060, "<p>A</p>")]),
    ("duplicate", good_pair(1000)[:1]),
    ("answer_orphan", [builder.answer_row(51, 50, "<p>A</p>")]),
    ("answer_malformed", ['<row Id="51" PostTypeId="2" ParentId="" Body="A" />']),
    ("other_post_type", ['<row Id="50" PostTypeId="5" Body="wiki" />']),
])
def test_each_distractor_is_dropped_for_its_reason(tmp_path, reason, rows):
    kept = good_pair(1000)
    result = scrape_dump(write_dump(tmp_path / "Posts.xml", kept + rows), categories=CATEGORIES)
    assert [r["id"] for r in result.records] == [1000]
    assert result.dropped == Counter({reason: 1})


def test_unusable_accepted_answer_drops_its_question_too(tmp_path):
    rows = [builder.question_row(50, "T", "<p>B</p>", ["nlp"], accepted=51),
            builder.answer_row(51, 50, "<p>\x85\x80</p>"),  # C1 control characters only
            builder.question_row(60, "U", "<p>C</p>", ["nlp"], accepted=61)]  # 61 is absent
    result = scrape_dump(write_dump(tmp_path / "Posts.xml", rows), categories=CATEGORIES)
    assert result.records == []
    assert result.dropped == Counter({"answer_bad_characters": 1, "no_usable_answer": 2})


def test_duplicates_keep_the_best_copy_whose_answer_is_usable(tmp_path):
    # Three copies of one question: the first's accepted answer is junk, the second's is absent,
    # the third's is good. Only the third can be kept, although it comes last.
    rows = [builder.question_row(50, "Same question", "<p>Same body</p>", ["nlp"], accepted=51),
            builder.answer_row(51, 50, "<p>\x85\x80</p>"),
            builder.question_row(60, "Same question", "<p>Same body</p>", ["nlp"], accepted=61),
            builder.question_row(70, "Same question!", "<p>Same  body</p>", ["nlp"], accepted=71),
            builder.answer_row(71, 70, "<p>Good answer</p>")]
    result = scrape_dump(write_dump(tmp_path / "Posts.xml", rows), categories=CATEGORIES)
    assert [(r["id"], r["answer"]) for r in result.records] == [(70, "Good answer")]
    assert result.dropped == Counter({"answer_bad_characters": 1, "no_usable_answer": 2})

    # Among usable copies: the highest question score wins, then the lowest id; the file order
    # does not matter.
    def pair(qid, score):
        return [builder.question_row(qid, "Same question", "<p>Same body</p>", ["nlp"],
                                     score=score, accepted=qid + 1),
                builder.answer_row(qid + 1, qid, f"<p>Answer {qid}</p>")]

    scores = {50: 1, 60: 9, 70: 9}
    for order in ([50, 60, 70], [70, 60, 50]):
        rows = [r for qid in order for r in pair(qid, scores[qid])]
        result = scrape_dump(write_dump(tmp_path / "Posts.xml", rows), categories=CATEGORIES)
        assert [r["id"] for r in result.records] == [60]
        assert result.dropped == Counter({"duplicate": 2})


def test_near_duplicates_differ_only_in_case_whitespace_or_punctuation():
    base = duplicate_key("Why is my loss NaN?", "The loss becomes NaN, after epoch 3.")
    assert base == duplicate_key("why is my loss nan", "The loss  becomes\nNaN after epoch 3")
    assert base == duplicate_key("Why is my loss `NaN`?!", "**The loss** becomes NaN... after epoch 3")
    assert base != duplicate_key("Why is my loss NaN?", "The loss becomes NaN after epoch 4.")
    assert base != duplicate_key("Why is my loss inf?", "The loss becomes NaN, after epoch 3.")
    # Title and body are kept apart: moving words between them makes another question.
    assert duplicate_key("a b", "c") != duplicate_key("a", "b c")


def test_answers_before_their_questions_are_still_paired(tmp_path):
    rows = []
    for qid in range(10, 200, 10):
        rows += good_pair(qid, answer_first=True)
    rows += [builder.answer_row(5, 10, "<p>Not accepted, comes first</p>", score=99)]
    result = scrape_dump(write_dump(tmp_path / "Posts.xml", rows), categories=CATEGORIES)
    assert [(r["id"], r["answer"]) for r in result.records] == [
        (qid, f"Answer to {qid}") for qid in range(10, 200, 10)]
    assert result.unused_answers == 1 and not result.dropped


def test_min_score_applies(tmp_path):
    rows = good_pair(10) + [
        builder.question_row(20, "Low", "<p>B</p>", ["nlp"], score=2, accepted=21),
        builder.answer_row(21, 20, "<p>A</p>")]
    path = write_dump(tmp_path / "Posts.xml", rows)
    def kept(min_score):
        result = scrape_dump(path, categories=CATEGORIES, min_score=min_score)
        return [r["id"] for r in result.records]

    assert kept(3) == [10] and kept(0) == [10, 20]


# ------------------------------------------------------------------------------ streaming
def off_topic_dump(path: Path, n_questions: int) -> Path:
    """Mostly off-topic questions and answers with ~1 KB bodies, a few kept pairs."""
    filler = "<p>" + "lorem ipsum dolor sit amet " * 40 + "</p>"
    rows = []
    for i in range(1, n_questions + 1):
        qid = 10 * i
        if i % 50 == 0:
            rows += good_pair(qid)
        else:
            rows += [builder.question_row(qid, f"Q{qid}", filler, ["javascript"], accepted=qid + 1),
                     builder.answer_row(qid + 1, qid, filler)]
    return write_dump(path, rows)


def test_chunk_boundaries_do_not_change_the_result(tmp_path, sample_dump):
    small_chunks = scrape_dump(sample_dump, categories=CATEGORIES, chunk_size=97)
    one_chunk = scrape_dump(sample_dump, categories=CATEGORIES, chunk_size=1 << 24)
    assert small_chunks.records == one_chunk.records
    assert small_chunks.dropped == one_chunk.dropped


def test_dump_is_streamed_with_memory_independent_of_file_size(tmp_path):
    chunk = 64 * 1024

    def peak_bytes(path: Path) -> int:
        tracemalloc.start()
        try:
            result = scrape_dump(path, categories=CATEGORIES, chunk_size=chunk)
            return tracemalloc.get_traced_memory()[1], result
        finally:
            tracemalloc.stop()

    small = off_topic_dump(tmp_path / "small.xml", 300)
    big = off_topic_dump(tmp_path / "big.xml", 2400)
    assert big.stat().st_size > 7 * small.stat().st_size
    peak_small, result_small = peak_bytes(small)
    peak_big, result_big = peak_bytes(big)
    assert len(result_small.records) == 6 and len(result_big.records) == 48
    # 8x the input: the peak grows only by the few extra kept records, not with the file.
    assert peak_big < big.stat().st_size / 4
    assert peak_big < 1.5 * peak_small + 200_000


def varied_pairs_dump(path: Path, n_pairs: int) -> Path:
    """Kept pairs with code blocks, entities and lists, some answers first, among off-topic rows."""
    rows = []
    for i in range(1, n_pairs + 1):
        qid = 10 * i
        question = (f"<p>Why does <code>fit_{i}(x)</code> fail &amp; return &lt;{i}&gt;?</p>\n"
                    f'<pre class="lang-py prettyprint-override"><code>for k in range({i}):\n'
                    f"    print(&quot;max_len&quot;, k)\n</code></pre>")
        answer = f"<ul><li>step {i}</li><li>then <em>call</em> <code>x_{i}</code></li></ul>"
        q = builder.question_row(qid, f"Question {i}", question, ["pytorch"], accepted=qid + 1)
        a = builder.answer_row(qid + 1, qid, answer)
        rows += [a, q] if i % 7 == 0 else [q, a]
        rows.append(builder.question_row(qid + 5, f"Off {i}", "<p>css</p>", ["css"]))
    return write_dump(path, rows)


def test_parallel_conversion_gives_the_same_records_as_serial(tmp_path, monkeypatch):
    path = varied_pairs_dump(tmp_path / "Posts.xml", 23)
    monkeypatch.setattr(dump, "CONVERT_CHUNK", 2)  # many chunks: order across chunks matters
    serial = scrape_dump(path, categories=CATEGORIES, workers=1)

    sent = []
    apply_async = multiprocessing.pool.Pool.apply_async
    monkeypatch.setattr(multiprocessing.pool.Pool, "apply_async",
                        lambda pool, *a, **kw: sent.append(a) or apply_async(pool, *a, **kw))
    parallel = scrape_dump(path, categories=CATEGORIES, workers=2)

    assert len(sent) == 12  # 23 pairs in chunks of 2 really went through the pool
    assert len(serial.records) == 23
    assert "```py\nfor k in range(3):" in serial.records[2]["question"]
    assert json.dumps(parallel.records) == json.dumps(serial.records)  # same order, same bytes
    assert parallel.dropped == serial.dropped and parallel.rows_read == serial.rows_read


def test_a_few_kept_rows_do_not_start_a_pool(tmp_path, monkeypatch):
    path = varied_pairs_dump(tmp_path / "Posts.xml", 3)
    def no_pool(*args, **kwargs):
        raise AssertionError("a pool was started for fewer pairs than one chunk")
    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", no_pool)
    result = scrape_dump(path, categories=CATEGORIES, workers=4)
    assert [r["id"] for r in result.records] == [10, 20, 30]


def test_workers_zero_means_one_per_cpu_and_negative_is_an_error():
    assert resolve_workers(3) == 3
    assert 1 <= resolve_workers(0) <= (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="workers"):
        resolve_workers(-1)
    with pytest.raises(ValidationError, match="workers"):
        ScrapeParams(workers=-1)


def test_not_well_formed_xml_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "Posts.xml"
    path.write_text('<posts>\n<row Id="1" PostTypeId="1"\n<row Id="2" />\n</posts>\n')
    with pytest.raises(DumpFormatError, match=r"Posts\.xml.*line 3"):
        scrape_dump(path, categories=CATEGORIES)


# ------------------------------------------------------------------------- source errors
def test_missing_input_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "Posts.xml"
    with pytest.raises(FileNotFoundError, match=r"scrape\.sample_path.*nope/Posts\.xml"):
        run_scrape(ScrapeParams(sample_path=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"scrape\.dump_path.*nope/Posts\.xml"):
        run_scrape(ScrapeParams(source="dump", dump_path=str(missing)))


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValidationError, match="source"):
        ScrapeParams(source="web")
    with pytest.raises(ValueError, match="unknown source 'web'"):
        run_scrape(ScrapeParams.model_construct(source="web"))


# ---------------------------------------------------------------------------------- split
def test_split_never_moves_existing_ids_when_data_is_added():
    def split_of(ids):
        return {i: assign_split(i, dev=0.1, test=0.1, salt="meteor") for i in ids}

    before = split_of(range(1, 2001))
    after = split_of(range(1, 4001))
    assert {i: after[i] for i in before} == before
    # Another salt draws a different split.
    assert split_of(range(1, 2001)) != {i: assign_split(i, dev=0.1, test=0.1, salt="x")
                                         for i in range(1, 2001)}


def test_changing_a_fraction_moves_rows_as_the_docstring_says():
    def splits(dev, test):
        return {i: assign_split(i, dev=dev, test=test, salt="meteor") for i in range(5000)}

    def moves(before, after):
        return {(before[i], after[i]) for i in before if before[i] != after[i]}

    base = splits(dev=0.1, test=0.1)
    # Growing dev: from train into dev only.
    assert moves(base, splits(dev=0.2, test=0.1)) == {("train", "dev")}
    # Growing test: from dev into test and from train into dev, not only out of train.
    assert moves(base, splits(dev=0.1, test=0.2)) == {("dev", "test"), ("train", "dev")}


def test_split_fractions_are_roughly_right():
    counts = Counter(assign_split(i, dev=0.15, test=0.05, salt="meteor") for i in range(20_000))
    assert abs(counts["dev"] / 20_000 - 0.15) < 0.01
    assert abs(counts["test"] / 20_000 - 0.05) < 0.01


def test_split_records_sorts_each_split_by_id():
    records = [{"id": i, "category": "ML"} for i in range(300, 0, -1)]
    splits = split_records(records, ScrapeParams())
    assert sum(map(len, splits.values())) == 300
    for rows in splits.values():
        assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)


# ---------------------------------------------------------------------------------- stage
def test_stage_writes_splits_and_metrics(tmp_path, monkeypatch, sample_dump):
    params = {"scrape": {"sample_path": str(sample_dump), "split": {"dev": 0.2, "test": 0.2}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "stages/scrape.py"), run_name="__main__")

    rows = {name: [json.loads(line) for line in open(f"data/scraped/{name}.jsonl")]
            for name in ("train", "dev", "test")}
    metrics = json.loads(Path("metrics/scrape.json").read_text())
    assert metrics["kept_total"] == {**{k: len(v) for k, v in rows.items()},
                                     "total": 4 * AUTHORED_PER_FILE}
    for name, split_rows in rows.items():
        assert [r["id"] for r in split_rows] == sorted(r["id"] for r in split_rows)
        for cat in ("ML", "DL", "NLP", "CV"):
            assert metrics["kept"][cat][name] == sum(r["category"] == cat for r in split_rows)
    assert metrics["kept"]["ML"]["total"] == AUTHORED_PER_FILE
    assert metrics["dropped"]["off_topic"] == 2 and metrics["dropped_total"] == 17
    assert set(rows["train"][0]) == {"id", "category", "title", "question", "answer", "tags",
                                     "score", "link"}
