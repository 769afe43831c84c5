"""IFD / r-IFD scoring (meteor.ifd), the selection (meteor.selection) and stages/ifd_select.py.

The batched scorer is checked against a slow, obviously-correct reference: one forward pass per
sequence (batch 1, no padding) and a Python loop over the target tokens.
"""

from __future__ import annotations

import copy
import json
import math
import random
import runpy
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from meteor import ifd
from meteor.prompts import format_question, student_answer_messages
from meteor.selection import DROP_REASONS, SelectionRules, build_pool, select, selection_metrics

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

WORDS = ("gradient descent lowers the loss while the validation curve tells us when to stop; "
         "a convolution slides filters over the image and tokenization splits text").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Question rows with answers of varied lengths (some long enough to be truncated)."""
    rng = random.Random(seed)
    categories = ("ML", "DL", "NLP", "CV")
    rows = []
    for i in range(n):
        rows.append({"id": 1000 + i, "category": categories[i % 4],
                     "title": _text(rng, rng.randint(3, 8)).capitalize() + "?",
                     "question": _text(rng, rng.randint(5, 40)),
                     "answer": _text(rng, rng.choice([1, 4, 15, 40, 90]))})
    return rows


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    from meteor.student.load import load_student

    model, tokenizer = load_student(tiny_model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def gpt2_student(student):
    """A scorer with *absolute* position embeddings: with RoPE (Llama) a shift of every position
    cancels out, so only such a model shows whether left padding keeps positions right."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = student
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(config).eval(), tok


# ------------------------------------------------------------------------ reference (slow)
def reference_mean_loss(model, prefix, target) -> float:
    """One sequence, batch 1, no padding; mean of -log p(token) over the target, token by token."""
    if not target:
        return math.nan
    ids = torch.tensor([[*prefix, *target]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    losses = []
    for k in range(len(prefix), len(prefix) + len(target)):
        log_probs = torch.log_softmax(logits[k - 1], dim=-1)
        losses.append(-log_probs[ids[0, k]].item())
    return sum(losses) / len(losses)


def reference_scores(model, tokenizer, rows, max_seq_len):
    out = []
    for row in rows:
        enc = ifd.encode_row(tokenizer, row, row["answer"], max_seq_len)
        l_ac, l_ad, l_qc, l_qd = (reference_mean_loss(model, p, t) for p, t in enc.sequences())
        out.append({
            "loss_answer_conditioned": l_ac, "loss_answer_direct": l_ad,
            "loss_question_conditioned": l_qc, "loss_question_direct": l_qd,
            "ifd_loss": l_ac / l_ad, "ifd_ppl": math.exp(l_ac) / math.exp(l_ad),
            "r_ifd": math.exp(l_qc) / math.exp(l_qd),
        })
    return out


def assert_close(a: float, b: float, what: str) -> None:
    if math.isnan(b):
        assert math.isnan(a), what
    else:
        assert abs(a - b) <= TOL, f"{what}: {a} vs {b}"


# --------------------------------------------------------------------------------- encoding
def test_minimal_prefix_is_bos_plus_assistant_header(student):
    _, tok = student
    prefix = ifd.minimal_prefix_ids(tok)
    assert tok.convert_ids_to_tokens(prefix) == ["<|bos|>", "<|assistant|>", "Ċ"]
    prompt = ifd.chat_prompt_ids(tok, student_answer_messages(make_rows(1)[0]))
    assert prompt[0] == tok.bos_token_id and prompt[-2:] == prefix[1:]  # the header ends the prompt


def test_both_passes_score_the_same_separately_tokenised_answer(student):
    _, tok = student
    row = make_rows(1)[0]
    enc = ifd.encode_row(tok, row, row["answer"], max_seq_len=512)
    answer_ids = tuple(tok(row["answer"], add_special_tokens=False)["input_ids"])
    (p_c, a_c), (p_d, a_d), (p_r, q_c), (p_q, q_d) = enc.sequences()
    assert a_c == a_d == answer_ids  # not truncated at 512: the whole answer, as tokenised alone
    assert p_c == tuple(ifd.chat_prompt_ids(tok, student_answer_messages(row)))
    assert p_d == p_q == tuple(ifd.minimal_prefix_ids(tok))
    assert q_c == q_d == tuple(tok(format_question(row), add_special_tokens=False)["input_ids"])


def test_reverse_prompt_shows_the_answer_and_hides_the_question(student):
    _, tok = student
    row = make_rows(1)[0]
    messages = ifd.reverse_question_messages(row, row["answer"])
    user = messages[-1]["content"]
    assert row["answer"] in user and "guess the question" in user.lower()
    assert row["title"] not in user and row["question"] not in user
    enc = ifd.encode_row(tok, row, row["answer"], max_seq_len=512)
    assert enc.reverse_prompt == tuple(ifd.chat_prompt_ids(tok, messages))
    assert enc.reverse_answer_tokens == len(enc.answer)


@pytest.mark.parametrize("max_seq_len", [120, 250, 400])
def test_truncation_is_the_same_in_both_passes(student, max_seq_len):
    _, tok = student
    for row in make_rows(12, seed=1):
        enc = ifd.encode_row(tok, row, row["answer"], max_seq_len)
        full_answer = tok(row["answer"], add_special_tokens=False)["input_ids"]
        full_question = tok(format_question(row), add_special_tokens=False)["input_ids"]
        assert enc.answer == tuple(full_answer[:len(enc.answer)])  # the start of the answer
        budget = max(0, max_seq_len - len(enc.answer_prompt))
        assert len(enc.answer) == min(len(full_answer), budget)
        assert enc.question == tuple(full_question[:len(enc.question)])
        for prefix, target in enc.sequences():  # a sequence with no target is never run
            assert not target or len(prefix) + len(target) <= max_seq_len
        # the question is cut only when it does not fit even after an empty answer
        if len(enc.question) < len(full_question):
            assert enc.reverse_answer_tokens == 0
        assert enc.reverse_answer_tokens <= len(enc.answer)


def test_truncation_gives_the_reference_numbers(student):
    model, tok = student
    rows = make_rows(6, seed=2)
    got = ifd.score_rows(model, tok, rows, max_seq_len=250, batch_size=4)
    assert all(0 < s.answer_tokens for s in got)
    assert any(s.answer_tokens < s.answer_tokens_total for s in got)  # answer cut
    assert any(0 < s.reverse_answer_tokens < s.answer_tokens for s in got)  # shown answer shortened
    assert any(0 < s.question_tokens < s.question_tokens_total for s in got)  # question cut
    for g, r in zip(got, reference_scores(model, tok, rows, 250)):
        for k, v in r.items():
            assert_close(getattr(g, k), v, k)


# ------------------------------------------------------------------- batched == reference
@pytest.mark.parametrize("scorer", ["student", "gpt2_student"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_scores_equal_the_reference(request, scorer, padding_side, batch_size):
    model, tok = request.getfixturevalue(scorer)
    rows = make_rows(10, seed=3)
    reference = reference_scores(model, tok, rows, 400)
    got = ifd.score_rows(model, tok, rows, max_seq_len=400, batch_size=batch_size,
                         padding_side=padding_side)
    lengths = {s.answer_tokens for s in got}
    assert min(lengths) < 10 and max(lengths) > 150 and all(math.isfinite(s.r_ifd) for s in got)
    for g, r in zip(got, reference):
        for k, v in r.items():
            assert_close(getattr(g, k), v, f"{k} (batch {batch_size}, {padding_side})")


def test_scores_do_not_depend_on_row_order(student):
    model, tok = student
    rows = make_rows(9, seed=4)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    a = {r["id"]: s for r, s in zip(rows, ifd.score_rows(model, tok, rows, max_seq_len=400,
                                                         batch_size=4))}
    b = {r["id"]: s for r, s in zip(shuffled, ifd.score_rows(model, tok, shuffled,
                                                             max_seq_len=400, batch_size=4))}
    assert all(math.isfinite(s.ifd_loss) for s in a.values())
    for i in a:
        assert_close(a[i].ifd_loss, b[i].ifd_loss, "ifd_loss")
        assert_close(a[i].r_ifd, b[i].r_ifd, "r_ifd")


def test_merged_adapter_scores_like_the_adapter(student):
    """The stage folds a LoRA adapter into the weights before scoring; the scores stay the same."""
    from peft import LoraConfig, get_peft_model

    model, tok = student
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    rows = make_rows(4, seed=5)
    with_adapter = ifd.score_rows(peft_model, tok, rows, max_seq_len=400, batch_size=2)
    merged = peft_model.merge_and_unload()
    folded = ifd.score_rows(merged, tok, rows, max_seq_len=400, batch_size=2)
    base = reference_scores(merged, tok, rows, 400)
    assert all(math.isfinite(s.ifd_loss) for s in folded)
    for a, b, r in zip(with_adapter, folded, base):
        assert_close(a.ifd_loss, b.ifd_loss, "ifd_loss")
        assert_close(b.ifd_loss, r["ifd_loss"], "ifd_loss vs reference")


def test_empty_answer_has_nan_ifd_and_a_finite_r_ifd(student):
    model, tok = student
    rows = make_rows(3, seed=6)
    rows[1] = {**rows[1], "answer": ""}
    got = ifd.score_rows(model, tok, rows, max_seq_len=512, batch_size=8)
    assert got[1].answer_tokens == 0 and math.isnan(got[1].ifd_loss) and math.isnan(got[1].ifd_ppl)
    assert math.isnan(got[1].loss_answer_conditioned) and math.isfinite(got[1].r_ifd)
    assert all(math.isfinite(s.ifd_loss) for s in (got[0], got[2]))


def test_prompt_longer_than_the_context_leaves_nothing_to_score(student):
    model, tok = student
    row = {**make_rows(1)[0], "question": " ".join(["overfitting"] * 200)}
    (s,) = ifd.score_rows(model, tok, [row], max_seq_len=120, batch_size=1)
    assert s.answer_tokens == 0 and math.isnan(s.ifd_loss)


def test_identical_sequences_are_scored_once(student):
    model, tok = student
    calls = []
    original = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.forward = counting
    try:
        row = make_rows(1)[0]
        done, stats = [], {}
        (a, b) = ifd.score_rows(model, tok, [row, dict(row)], max_seq_len=512, batch_size=16,
                                progress=done.append, stats=stats)
    finally:
        del model.forward
    assert sum(calls) == 4  # two identical rows: four unique sequences
    assert sum(done) == 8  # progress counts every requested sequence
    assert stats["sequences"] == 8 and stats["unique_sequences"] == 4
    assert a == b and math.isfinite(a.r_ifd)


# ---------------------------------------------------------------------------------- selection
def scored(i, source, ifd_value, category="ML", r_ifd=0.5, tokens=50, answer=None):
    return {"id": i, "source": source, "category": category, "ifd": ifd_value, "r_ifd": r_ifd,
            "answer_tokens_total": tokens, "answer": answer or f"answer {i} {source}"}


def kept_keys(rows, selection):
    return [(rows[i]["id"], rows[i]["source"]) for i in selection.kept_indices]


def test_filters_count_each_row_under_its_first_reason():
    rows = [
        scored(1, "distilled", 0.9, tokens=3),  # too short (and fine otherwise)
        scored(2, "distilled", math.nan),
        scored(3, "distilled", math.inf),
        scored(4, "distilled", 1.0),  # ifd >= max_ifd
        scored(5, "distilled", 0.8, r_ifd=1.2),
        scored(6, "distilled", 0.7, answer="same"),
        scored(6, "refined", 0.7, answer="same"),  # refine kept the teacher's answer
        scored(7, "distilled", 0.6),
    ]
    sel = select(rows, SelectionRules(min_answer_tokens=8, max_r_ifd=1.0))
    assert sel.drop_reason == ["too_short", "not_finite", "not_finite", "ifd_at_least_max",
                               "r_ifd_at_least_max", None, "duplicate", None]
    sel = select(rows, SelectionRules(min_answer_tokens=8))  # r_ifd does not select by default
    assert sel.drop_reason[4] is None


def test_per_question_best_keeps_the_lower_ifd_version_and_both_keeps_both():
    rows = [scored(1, "distilled", 0.9), scored(1, "refined", 0.7),
            scored(2, "distilled", 0.6), scored(2, "refined", 0.8),
            scored(3, "distilled", 0.5), scored(3, "refined", 0.5)]  # a tie: the distilled one
    sel = select(rows, SelectionRules(per_question="best"))
    assert kept_keys(rows, sel) == [(1, "refined"), (2, "distilled"), (3, "distilled")]
    assert sel.drop_reason.count("other_version_kept") == 3
    sel = select(rows, SelectionRules(per_question="both"))
    assert len(sel.kept_indices) == 6


def test_top_fraction_per_chunk_keeps_the_highest_ifd_in_pool_order():
    rows = []
    for k, category in enumerate(("ML", "DL")):
        for j, value in enumerate([0.2, 0.9, 0.5, 0.7, 0.3]):
            rows.append(scored(100 * k + j, "distilled", value, category=category))
    rows.append(scored(999, "distilled", 0.1, category="CV"))  # one row: ceil keeps it
    sel = select(rows, SelectionRules(fraction=0.5))
    # ceil(0.5 * 5) = 3 per chunk: 0.9, 0.7, 0.5, written in pool order
    assert kept_keys(rows, sel) == [(1, "distilled"), (2, "distilled"), (3, "distilled"),
                                    (101, "distilled"), (102, "distilled"), (103, "distilled"),
                                    (999, "distilled")]
    assert sel.kept_indices == sorted(sel.kept_indices)
    assert sel.drop_reason.count("below_fraction") == 4


def test_chunk_by_source():
    rows = [scored(i, s, 0.1 * (i + 1), category="ML")
            for i in range(4) for s in ("distilled", "refined")]
    sel = select(rows, SelectionRules(chunk_by="source", per_question="both", fraction=0.5))
    assert set(sel.chunk) == {"distilled", "refined"}
    assert kept_keys(rows, sel) == [(2, "distilled"), (2, "refined"),
                                    (3, "distilled"), (3, "refined")]


def test_ties_are_broken_by_id_whatever_the_row_order():
    rows = [scored(i, "distilled", 0.5) for i in (5, 3, 9, 1, 7)]
    picks = set()
    for seed in range(5):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        sel = select(shuffled, SelectionRules(fraction=0.4))  # ceil(2.0) = 2 of 5 equal scores
        picks.add(frozenset(shuffled[i]["id"] for i in sel.kept_indices))
    assert picks == {frozenset({1, 3})}


def test_metrics_count_every_row_once():
    rows = [scored(1, "distilled", 0.9, tokens=2), scored(1, "refined", 0.7),
            scored(2, "distilled", 0.6, category="DL"), scored(2, "refined", 1.3, category="DL")]
    for r in rows:
        r.update(ifd_loss=r["ifd"], ifd_ppl=r["ifd"])
    sel = select(rows, SelectionRules(min_answer_tokens=8))
    m = selection_metrics(rows, sel)
    assert m["pool"] == 4 and m["kept"] == 2
    assert m["kept_by_source"] == {"distilled": 1, "refined": 1}
    assert m["kept"] + sum(m["dropped"].values()) == m["pool"]
    assert set(m["dropped"]) == set(DROP_REASONS)
    assert m["chunks"]["DL"]["dropped"]["ifd_at_least_max"] == 1
    assert m["chunks"]["ML"]["scores"]["refined"]["ifd"]["median"] == 0.7


def test_pool_joins_questions_and_skips_rows_without_an_answer():
    questions = [
        {"id": 1, "category": "ML", "title": "T1", "question": "Q1", "answer": "SO answer"},
        {"id": 2, "category": "CV", "title": "T2", "question": "Q2", "answer": "SO answer"},
    ]
    distilled = [{"id": 1, "answer": " teacher 1 ", "ok": True},
                 {"id": 2, "answer": None, "ok": False}]
    refined = [{"id": 1, "final_answer": "student 1", "source": "student"},
               {"id": 2, "final_answer": None, "source": None}]
    pool, skipped = build_pool(distilled, refined, questions)
    assert [(r["id"], r["source"], r["answer"], r["answer_by"]) for r in pool] == [
        (1, "distilled", "teacher 1", "teacher"), (1, "refined", "student 1", "student")]
    assert pool[0]["title"] == "T1" and pool[0]["category"] == "ML"
    assert skipped["distilled"]["not_ok"] == 1 and skipped["refined"]["no_answer"] == 1
    with pytest.raises(ValueError, match="re-run the refine stage"):
        build_pool(distilled, [{"id": 3, "final_answer": "x"}], questions)


# -------------------------------------------------------------------------------- the stage
def test_stage_writes_chunks_scores_metrics_and_histogram(tiny_model_dir, tmp_path, monkeypatch):
    questions = make_rows(8, seed=7)
    (tmp_path / "data" / "scraped").mkdir(parents=True)
    (tmp_path / "data" / "scraped" / "train.jsonl").write_text(
        "".join(json.dumps({**q, "answer": "accepted"}) + "\n" for q in questions))
    distilled = [{**q, "ok": True} for q in questions]
    distilled[0] = {**distilled[0], "ok": False, "answer": None}
    refined = [{"id": q["id"], "final_answer": q["answer"] if i % 2 else q["answer"] + " indeed",
                "source": "teacher" if i % 2 else "student"} for i, q in enumerate(questions)]
    for name, rows in (("distilled", distilled), ("refined", refined)):
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        (tmp_path / "data" / f"{name}.jsonl").write_text(lines)
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "scorer")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ifd_select": {
        "model": "models/scorer", "max_ifd": 10.0, "min_answer_tokens": 2, "fraction": 0.5,
        "max_seq_len": 256, "batch_size": 4}}))
    monkeypatch.chdir(tmp_path)

    runpy.run_path(str(ROOT / "stages" / "ifd_select.py"), run_name="__main__")
    metrics = json.loads((tmp_path / "metrics" / "ifd.json").read_text())
    scores = [json.loads(x)
              for x in (tmp_path / "data" / "ifd_scores.jsonl").read_text().splitlines()]
    assert len(scores) == metrics["pool"] == 15  # one distilled row not ok
    assert metrics["rows_skipped"]["distilled"]["not_ok"] == 1
    # refined rows 1, 3, 5, 7 repeat their distilled answer
    assert metrics["dropped"]["duplicate"] == 4
    assert metrics["kept"] + sum(metrics["dropped"].values()) == metrics["pool"]
    files = sorted(p.name for p in (tmp_path / "data" / "selected").iterdir())
    assert files == sorted(f"{c}.jsonl" for c in metrics["chunks"])
    kept = [json.loads(x) for f in files
            for x in (tmp_path / "data" / "selected" / f).read_text().splitlines()]
    assert len(kept) == metrics["kept"] and kept
    for row in kept:
        assert {"id", "category", "title", "question", "answer", "source", "ifd", "ifd_loss",
                "ifd_ppl", "r_ifd", "loss_answer_conditioned", "answer_tokens"} <= set(row)
        assert row["ifd"] == row["ifd_loss"] and row["answer"] != "accepted"
    assert (tmp_path / "metrics" / "ifd_hist.png").read_bytes()[:4] == b"\x89PNG"

    first = {p.name: p.read_bytes() for p in (tmp_path / "data" / "selected").iterdir()}
    runpy.run_path(str(ROOT / "stages" / "ifd_select.py"), run_name="__main__")
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "data" / "selected").iterdir()}


def test_bad_params_name_the_key(tmp_path):
    from meteor.all_params import load_params
    from meteor.params import ParamsError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"ifd_select": {"fraction": 0, "score": "r_ifd"}}))
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert "ifd_select.fraction" in str(e.value) and "ifd_select.score" in str(e.value)
