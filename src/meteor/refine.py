"""METEOR 2: iterative refinement with feedback and in-loop fine-tuning (SelFee and SELF options).

For each question the student answers with its reasoning
(:func:`meteor.prompts.student_answer_messages`); the teacher returns a structured
:class:`~meteor.teacher.base.Verdict` ``{correct, feedback, hints}``;
a wrong answer is revised by the student given the question, its previous answer and feedback
(:func:`meteor.prompts.revision_messages`), for at most ``max_iterations`` attempts. The feedback is
the teacher's (``feedback: teacher``) or the student's own critique (``feedback: self``, SELF), the
teacher still deciding correctness. Every attempt is recorded.

**SELF's meta-skill.** With ``feedback: self`` the student also *learns* to critique, as SELF
trains it to: each critiqued answer of a trained question adds a training example whose prompt is
the self-critique prompt (:func:`meteor.prompts.self_critique_messages`) and whose target is the
teacher's feedback on that answer, so every in-loop update improves both the answers and the
critiques the next rounds are revised with.

**In-loop updates.** A question's *training row* is its accepted final answer, or, with
``keep_failed: reference``, the teacher's distilled answer for a question never judged correct.
Each time the training rows reach a multiple of ``fine_tune_interval``, the current student is
fine-tuned on the rows gathered *since the previous update* (each row is trained on exactly once;
the same adapter keeps learning across updates, so earlier rows are not forgotten by design, and
the cost stays linear in the data) and generation continues with the updated model. An update
must take at least one optimiser step and change the trainable weights, or the run stops with an
error (the published code takes zero steps). Rows gathered after the last update (fewer than
``fine_tune_interval``) are not trained on; the metrics count them.

**Batching without changing the method.** Questions are processed in groups whose size is the
number of training rows still missing before the next update: each question yields at most one
training row, so an update can only fall due at the end of a group, exactly where the
one-question-at-a-time loop would make it. Within a group, generation and teacher calls are
batched across questions and iterations proceed in lock-step.

**Targets.** ``final`` (METEOR): user = the question, assistant = the final answer, with the same
system prompt the student answered under. ``chain`` (SelFee): the assistant turn is the whole
answer -> feedback -> revision chain (:func:`meteor.prompts.selfee_chain`), ending with feedback
that says no revision is needed. A student trained on chains writes chains, so with ``chain`` each
generated text is cut to its last revision (:func:`final_revision`) before it is judged, revised or
stored as ``final_answer``; the whole text is kept in the attempt's ``chain`` field.

**Options, not branches.** The target is a :class:`Target` (:class:`FinalTarget`,
:class:`ChainTarget`: how a generated text is read, what a question is trained on), the feedback a
:class:`Critic` (:class:`TeacherCritic`, :class:`SelfCritic`: who writes the feedback, which extra
examples that teaches), both chosen once from the params (:data:`TARGETS`, :data:`CRITICS`);
:class:`Refiner` only groups the questions, times the updates and calls the student and teacher.

**keep_failed** (questions never judged correct): ``drop`` (no final answer, not trained on),
``last`` (the last attempt is kept as the final answer, marked failed, not trained on),
``reference`` (the teacher's distilled answer becomes the final answer and is trained on; the
default, because the tiny student rarely satisfies the offline teacher, and with ``drop`` the
embedded pipeline would then make no in-loop update at all).

**Bad input.** Distilled rows with ``ok: false`` or no answer are skipped and counted; a question
whose answer prompt leaves no room to train on an answer (``>= train.max_seq_len`` tokens) or to
generate one (prompt + ``max_new_tokens`` beyond the model's context) is skipped and counted
(``too_long``); a revision prompt too long for the context has the previous answer and the
feedback cut to fit (counted: question + answer + feedback easily exceed a small model's 512
tokens), and a revision or self-critique prompt that cannot fit even so ends that question's
revisions (counted); a verdict the teacher could not give (``TeacherResult.ok`` false,
e.g. JSON that failed validation after the re-asks) ends that question as ``teacher_error``,
recorded with the reason and counted, never trained on. An empty student answer is rejected
without a teacher call (``judged_by: empty_answer_rule``, counted): there is nothing to judge,
and nothing a row could be trained on.

Deterministic: greedy (or seeded) generation, seeded training (update ``k`` uses seed
``train.seed + k - 1``), and teacher calls served from the persistent cache on a re-run, so a run
killed halfway and started again retraces the same trajectory without paying twice.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import Field
from tqdm.auto import tqdm

from meteor import refine_prompts as prompts
from meteor.params import Section
from meteor.rows import balanced_head, join_to_questions
from meteor.student.generate import (GenerationParams, encode_prompts, generate,
                                     generation_kwargs)
from meteor.student.load import context_length
from meteor.student.weights import weight_fingerprint
from meteor.teacher.base import Teacher, TeacherResult, Verdict
from meteor.teacher.chat import BUDGET
from meteor.training.config import LoraParams, TrainParams
from meteor.training.loop import train
from meteor.training.session import TrainSession


class RefineTrainParams(TrainParams):
    """Each in-loop update: one pass over the rows since the last update. Its own class, so a
    partial ``refine.train`` in params.yaml keeps these defaults rather than sft's."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    # No warmup: an update is a step or two on an already-trained adapter, and the first warmup
    # step has learning rate 0, so a one-step update would change nothing.
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup steps / total steps.")
    lora: LoraParams = Field(
        default_factory=LoraParams,
        description="Must describe the sft adapter, which refine keeps training (a value that "
                    "differs is refused, naming the key); with a fully fine-tuned sft model, "
                    "enabled: true trains a new adapter on it.")


class RefineParams(Section):
    max_iterations: int = Field(3, ge=1, description="Answer + at most N-1 revisions per question.")
    fine_tune_interval: int = Field(
        10, ge=1, description="Update the student every N training rows (accepted answers, plus "
                              "teacher answers with keep_failed=reference).")
    target: Literal["final", "chain"] = Field("final", description="METEOR final answer or SelFee chain.")
    feedback: Literal["teacher", "self"] = Field(
        "teacher", description="Who critiques a wrong answer: the teacher, or (SELF) the student "
                               "itself, which then also learns to critique: each update trains "
                               "it on the teacher's feedback for its critiqued answers. The "
                               "teacher decides correctness either way.")
    keep_failed: Literal["drop", "last", "reference"] = Field(
        "reference", description="Rows never judged correct: drop, keep the last attempt (not "
                                 "trained on), or train on the teacher's distilled answer. The "
                                 "default keeps in-loop updates happening when the student rarely "
                                 "passes (the tiny student against the offline teacher).")
    limit: int | None = Field(None, ge=1, description="Only N questions, taken in turn from each "
                              "category (debugging).")
    max_new_tokens: int = Field(
        128, ge=1, description="Per answer, revision or self-critique (generation's default; "
                               "kept at it to pay for the 1024-token training examples).")
    max_failed_fraction: float = Field(
        0.05, ge=0, le=1, description="Above this share of questions that got no teacher verdict, "
                                      "the stage writes its outputs and metrics, then exits "
                                      "non-zero; a re-run resumes from the cache.")
    train: RefineTrainParams = Field(default_factory=RefineTrainParams)

log = logging.getLogger(__name__)

# Why a distilled row is not refined.
NOT_OK, NO_ANSWER, TOO_LONG = "not_ok", "no_answer", "too_long"
SKIP_REASONS = (NOT_OK, NO_ANSWER, TOO_LONG)

# What became of a refined question.
PASSED, DROPPED, KEPT_LAST, REFERENCE, TEACHER_ERROR = (
    "passed", "dropped", "kept_last", "reference", "teacher_error")
OUTCOMES = (PASSED, DROPPED, KEPT_LAST, REFERENCE, TEACHER_ERROR)

EMPTY_VERDICT = Verdict(correct=False, feedback=prompts.EMPTY_ANSWER_FEEDBACK, hints=[])


# ------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class RefineInput:
    question: dict  # the train record: id, category, title, question, answer (the reference)
    teacher_answer: str  # the teacher's distilled answer (trained on with keep_failed=reference)


def refine_inputs(distilled_rows: Sequence[dict], train_rows: Sequence[dict],
                  limit: int | None = None) -> tuple[list[RefineInput], Counter]:
    """Distilled rows (``limit`` of them taken in turn from each category) joined to their train
    questions by id, in order.

    The train record carries the reference answer the offline teacher judges against. Rows with
    ``ok: false`` (a failed distill call) or without an answer are skipped; returns the inputs and
    the skip counts by reason.
    """
    pairs = join_to_questions(balanced_head(distilled_rows, limit), train_rows, what="distilled",
                              rerun="distill")
    inputs, skipped = [], Counter()
    for row, question in pairs:
        answer = row.get("answer")
        if row.get("ok") is False:
            skipped[NOT_OK] += 1
        elif not isinstance(answer, str) or not answer.strip():
            skipped[NO_ANSWER] += 1
        else:
            inputs.append(RefineInput(question, answer))
    if skipped:
        log.warning("skipped %d of %d distilled rows: %s", sum(skipped.values()), len(pairs),
                    dict(skipped))
    return inputs, skipped


# ------------------------------------------------------------------------------ per question
# keep_failed -> what a question never judged correct becomes, and who wrote its final answer.
FAILED_OUTCOMES = {"drop": (DROPPED, None), "last": (KEPT_LAST, "student"),
                   "reference": (REFERENCE, "teacher")}
TRAINED_OUTCOMES = (PASSED, REFERENCE)  # the outcomes whose final answer is trained on


@dataclass
class _Question:
    """One question in flight: its attempts so far and what became of it."""

    input: RefineInput
    attempts: list[dict] = field(default_factory=list)
    next_prompt: list[dict] | None = None  # the conversation of the next attempt
    passed_at: int | None = None  # 1-based iteration of the accepted attempt
    error: str | None = None  # why the teacher gave no verdict
    stopped_by_context: bool = False  # a revision prompt no longer fitted the context
    outcome: str | None = None
    final_answer: str | None = None
    source: str | None = None  # "student" | "teacher": who wrote final_answer
    example: list[dict] | None = None  # the chat example trained on, None if not trained
    critique_examples: list[list[dict]] = field(default_factory=list)  # SELF: learn to critique
    update: int | None = None  # 1-based index of the update it was trained in

    @property
    def question(self) -> dict:
        return self.input.question

    def settle(self, keep_failed: str) -> None:
        """Decide the outcome and the final answer once the attempts are over."""
        if self.error is not None:
            self.outcome = TEACHER_ERROR
            return
        if self.passed_at is not None:
            self.outcome, self.source = PASSED, "student"
        else:
            self.outcome, self.source = FAILED_OUTCOMES[keep_failed]
        written_by = {"student": self.attempts[-1]["answer"], "teacher": self.input.teacher_answer}
        self.final_answer = written_by.get(self.source)

    def row(self) -> dict:
        q = self.question
        return {
            "id": q["id"], "category": q.get("category"), "title": q["title"],
            "question": q["question"], "attempts": self.attempts,
            "final_answer": self.final_answer, "source": self.source,
            "passed": self.passed_at is not None, "passed_at": self.passed_at,
            "outcome": self.outcome, "error": self.error,
            "stopped_by_context": self.stopped_by_context, "update": self.update,
        }


def _attempt(iteration: int, answer: str, chain: str | None = None) -> dict:
    return {"iteration": iteration, "answer": answer, "chain": chain, "verdict": None,
            "judged_by": "teacher", "error": None, "feedback": None}


def _verdict_feedback(attempt: dict) -> str:
    """The teacher's feedback on an attempt, with its hints, as the student is shown it."""
    verdict = attempt["verdict"]
    return prompts.feedback_text(verdict["feedback"], verdict["hints"])


def _answer_example(question: dict, answer: str) -> list[dict]:
    """A chat example: the prompt the student answers under -> ``answer``."""
    return [*prompts.student_answer_messages(question), {"role": "assistant", "content": answer}]


# --------------------------------------------------------------- targets: what the student writes
def _header_pattern(template: str) -> str:
    return re.escape(template).replace(re.escape("{n}"), r"\d+")


# A line that opens a chain section, as selfee_chain writes it ("### Feedback 2").
_CHAIN_HEADER = re.compile(
    rf"^[ \t]*(?:(?P<feedback>{_header_pattern(prompts.SELFEE_FEEDBACK)})|"
    rf"(?P<revision>{_header_pattern(prompts.SELFEE_REVISION)}))[ \t]*$", re.MULTILINE)


def final_revision(text: str) -> str:
    """The answer a generated SelFee chain ends with: the text under its last ``### Revision n``
    header (the whole text when there is none), up to the next ``### Feedback n`` header."""
    headers = list(_CHAIN_HEADER.finditer(text))
    revisions = [m for m in headers if m.group("revision")]
    start = revisions[-1].end() if revisions else 0
    end = next((m.start() for m in headers if m.group("feedback") and m.start() >= start),
               len(text))
    return text[start:end].strip()


class Target(Protocol):
    """What the student is trained to write (param ``target``), so how its texts are read."""

    def read(self, text: str) -> tuple[str, str | None]:
        """The answer in a generated text (judged, revised, stored), and the chain kept, if any."""
        ...

    def example(self, item: _Question) -> list[dict]:
        """The chat example a passed (or reference) question is trained on."""
        ...


class FinalTarget:
    """METEOR: the student writes, and is trained on, the final answer alone."""

    def read(self, text: str) -> tuple[str, str | None]:
        return text, None

    def example(self, item: _Question) -> list[dict]:
        return _answer_example(item.question, item.final_answer)


class ChainTarget:
    """SelFee: the student writes, and is trained on, answer -> feedback -> revision; what it
    wrote is judged by its last revision."""

    def read(self, text: str) -> tuple[str, str | None]:
        return final_revision(text), text

    def example(self, item: _Question) -> list[dict]:
        answers = [a["answer"] for a in item.attempts]
        if item.outcome == PASSED:
            # The feedback that led to each revision; the accepted attempt's verdict closes it.
            feedbacks = [a["feedback"] or _verdict_feedback(a) for a in item.attempts[:-1]]
            chain = prompts.selfee_chain(answers, feedbacks,
                                         item.attempts[-1]["verdict"]["feedback"])
        else:  # REFERENCE: the student's attempts, then the teacher's answer as the last revision
            feedbacks = [a["feedback"] or _verdict_feedback(a) for a in item.attempts]
            chain = prompts.selfee_chain(answers + [item.final_answer], feedbacks, None)
        return _answer_example(item.question, chain)


TARGETS: dict[str, type[Target]] = {"final": FinalTarget, "chain": ChainTarget}


def training_example(item: _Question, target: str) -> list[dict]:
    """The chat example a passed (or reference) question is trained on under ``target``
    (a name in :data:`TARGETS`)."""
    return TARGETS[target]().example(item)


# ------------------------------------------------------------ critics: who writes the feedback
# Asks the student: its reply to each conversation that fits the context, None for the others.
AskStudent = Callable[[list[list[dict]]], list[str | None]]


class Critic(Protocol):
    """Who writes the feedback a wrong answer is revised with (param ``feedback``), and what
    else a settled question teaches the student besides its answer."""

    empty_feedback: int  # feedback that came back empty (a metric)

    def feedback(self, wrong: list[_Question], ask_student: AskStudent) -> list[str | None]:
        """The feedback on each question's last (wrong) answer; None ends its revisions."""
        ...

    def examples(self, item: _Question) -> list[list[dict]]:
        """Training examples besides the answer, for a passed (or reference) question."""
        ...


class TeacherCritic:
    """The teacher's feedback (with its hints) on the answer; nothing more to learn."""

    empty_feedback = 0

    def feedback(self, wrong: list[_Question], ask_student: AskStudent) -> list[str | None]:
        return [_verdict_feedback(item.attempts[-1]) for item in wrong]

    def examples(self, item: _Question) -> list[list[dict]]:
        return []


class SelfCritic:
    """SELF: the student critiques its own answer (the teacher still judges it), and learns to
    critique: each critiqued answer the teacher judged wrong adds the self-critique prompt ->
    the teacher's feedback on that answer (what the critique should have said)."""

    def __init__(self) -> None:
        self.empty_feedback = 0

    def feedback(self, wrong: list[_Question], ask_student: AskStudent) -> list[str | None]:
        # An empty answer has nothing to critique: it gets the empty-answer feedback instead.
        feedbacks: list[str | None] = [prompts.EMPTY_ANSWER_FEEDBACK] * len(wrong)
        to_critique = [j for j, item in enumerate(wrong) if item.attempts[-1]["answer"].strip()]
        critiques = ask_student([prompts.self_critique_messages(wrong[j].question,
                                                                wrong[j].attempts[-1]["answer"])
                                 for j in to_critique])
        for j, critique in zip(to_critique, critiques):
            feedbacks[j] = critique  # None: the critique prompt does not fit the context
        self.empty_feedback += sum(c is not None and not c.strip() for c in critiques)
        return feedbacks

    def examples(self, item: _Question) -> list[list[dict]]:
        examples = []
        for attempt in item.attempts:
            verdict = attempt["verdict"]
            if (attempt["feedback"] is None or attempt["judged_by"] != "teacher"
                    or verdict is None or verdict["correct"] or not attempt["answer"].strip()):
                continue  # only answers the student critiqued and the teacher judged wrong
            target = _verdict_feedback(attempt)
            if target.strip():
                examples.append([*prompts.self_critique_messages(item.question,
                                                                 attempt["answer"]),
                                 {"role": "assistant", "content": target}])
        return examples


CRITICS: dict[str, type[Critic]] = {"teacher": TeacherCritic, "self": SelfCritic}


def _shorten(text: str, keep: float) -> str:
    """The first ``keep`` (0..1) of ``text``, cut at a word and marked when anything was cut."""
    if keep >= 1:
        return text
    cut = text[:int(len(text) * keep)].rsplit(" ", 1)[0] if keep > 0 else ""
    return cut.rstrip() + " [...]"


# ------------------------------------------------------------------------------------ the run
@dataclass
class RefineRun:
    rows: list[dict]
    skipped: Counter  # too_long here; the stage adds the input skips
    updates: list[dict]  # one entry per in-loop update
    untrained_rows: int  # training rows gathered after the last update
    generations: int  # student generations (answers, revisions, self-critiques)
    empty_answers: int  # rejected without a teacher call
    revision_prompts_shortened: int  # previous answer and feedback cut to fit the context
    empty_self_feedback: int

    def metrics(self, max_iterations: int) -> dict[str, Any]:
        n = len(self.rows)
        outcomes = Counter(r["outcome"] for r in self.rows)
        passed_at = Counter(r["passed_at"] for r in self.rows if r["passed"])
        cumulative, pass_rate = 0, {}
        for k in range(1, max_iterations + 1):
            cumulative += passed_at[k]
            pass_rate[f"iter_{k}"] = round(cumulative / n, 4) if n else None
        return {
            "questions": n,
            "pass_rate_by_iteration": pass_rate,
            "pass_rate": round(outcomes[PASSED] / n, 4) if n else None,
            "outcomes": {o: outcomes[o] for o in OUTCOMES},
            "attempts": sum(len(r["attempts"]) for r in self.rows),
            "revision_prompts_shortened": self.revision_prompts_shortened,
            "stopped_by_context": sum(r["stopped_by_context"] for r in self.rows),
            "updates": len(self.updates),
            "optimizer_steps": sum(u["steps"] for u in self.updates),
            "examples_trained": sum(u["rows"] for u in self.updates),
            "critique_examples_trained": sum(u["critique_examples"] for u in self.updates),
            # Share of trained examples that kept their end-of-turn token (max_seq_len cuts).
            "examples_with_eos_share": (
                round(sum(u["examples_with_eos"] for u in self.updates)
                      / sum(u["examples_used"] for u in self.updates), 4)
                if any(u["examples_used"] for u in self.updates) else None),
            "rows_after_last_update": self.untrained_rows,
            "update_log": self.updates,
            "generations": self.generations,
            "empty_answers": self.empty_answers,
            "empty_self_feedback": self.empty_self_feedback,
            "budget_stopped": any(r["error"] == BUDGET for r in self.rows),
        }


class Refiner:
    """Refines questions with one student (trained in place) and one teacher.

    The loop owns the grouping of questions, the timing of the updates and the calls to the
    student and the teacher; what the student writes and is trained on is the :class:`Target`,
    who writes the feedback is the :class:`Critic`, both chosen once from ``params``.
    """

    def __init__(self, model, tokenizer, teacher: Teacher, params: RefineParams,
                 generation: GenerationParams, *, live=None):
        self.model = model
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.params = params
        self.target: Target = TARGETS[params.target]()
        self.critic: Critic = CRITICS[params.feedback]()
        self.gen_kwargs = generation_kwargs(generation, max_new_tokens=params.max_new_tokens,
                                            progress=False)
        self.context = context_length(model)
        self.live = live  # an open dvclive.Live: all updates log into one loss curve
        self.updates: list[dict] = []
        self.session: TrainSession | None = None  # one Accelerator for all updates (made lazily)
        self.generations = 0
        self.empty_answers = 0
        self.revision_prompts_shortened = 0

    # --- the outer loop: groups, settling, updates
    def run(self, inputs: Sequence[RefineInput]) -> RefineRun:
        if not inputs:
            raise ValueError("no questions to refine: the input data is empty (or every row was "
                             "skipped)")
        usable = self._skip_too_long(inputs)
        skipped = Counter({TOO_LONG: len(inputs) - len(usable)})
        if not usable:
            raise ValueError(f"all {len(inputs)} questions are too long for "
                             f"train.max_seq_len={self.params.train.max_seq_len} or the model's "
                             f"context ({self.context}); nothing to refine")
        interval = self.params.fine_tune_interval
        done: list[_Question] = []
        pending: list[_Question] = []  # training rows since the last update
        bar = tqdm(total=len(usable), desc="refine", unit="question")
        try:
            while len(done) < len(usable):
                # Each question adds at most one training row, so an update can only fall due at
                # the end of this group: batching leaves the trajectory unchanged.
                size = interval - len(pending)
                group = [_Question(i) for i in usable[len(done):len(done) + size]]
                self._refine_group(group)
                for item in group:
                    item.settle(self.params.keep_failed)
                    if item.outcome in TRAINED_OUTCOMES:
                        item.example = self.target.example(item)
                        item.critique_examples = self.critic.examples(item)
                        pending.append(item)
                done.extend(group)
                if len(pending) == interval:
                    self._update(pending)
                    pending = []
                bar.update(len(group))
                bar.set_postfix(passed=sum(q.outcome == PASSED for q in done),
                                updates=len(self.updates))
        finally:
            bar.close()
            if self.session is not None:
                self.session.close()
                self.session = None
        if pending:
            log.info("%d training rows after the last update are not trained on (fewer than "
                     "fine_tune_interval=%d)", len(pending), interval)
        return RefineRun(rows=[q.row() for q in done], skipped=skipped, updates=self.updates,
                         untrained_rows=len(pending), generations=self.generations,
                         empty_answers=self.empty_answers,
                         revision_prompts_shortened=self.revision_prompts_shortened,
                         empty_self_feedback=self.critic.empty_feedback)

    def _skip_too_long(self, inputs: Sequence[RefineInput]) -> list[RefineInput]:
        lengths = self._prompt_lengths(
            [prompts.student_answer_messages(i.question) for i in inputs])
        max_seq_len = self.params.train.max_seq_len
        usable = [i for i, n in zip(inputs, lengths)
                  if n < max_seq_len and self._fits_context(n)]
        if len(usable) < len(inputs):
            log.warning("skipped %d of %d questions whose answer prompt leaves no room for an "
                        "answer (train.max_seq_len=%d, context %s, max_new_tokens=%d)",
                        len(inputs) - len(usable), len(inputs), max_seq_len, self.context,
                        self.params.max_new_tokens)
        return usable

    # --- the student
    def _prompt_lengths(self, conversations: list[list[dict]]) -> list[int]:
        return [len(ids) for ids in encode_prompts(self.tokenizer, conversations)]

    def _fits_context(self, prompt_tokens: int) -> bool:
        return self.context is None or prompt_tokens + self.params.max_new_tokens <= self.context

    def _generate(self, conversations: list[list[dict]]) -> list[str]:
        self.generations += len(conversations)
        return generate(self.model, self.tokenizer, conversations, **self.gen_kwargs)

    def _ask_student(self, conversations: list[list[dict]]) -> list[str | None]:
        """The student's reply to each conversation whose prompt leaves room for
        ``max_new_tokens`` in the context, in one batch; None for the others."""
        replies: list[str | None] = [None] * len(conversations)
        if not conversations:
            return replies
        lengths = self._prompt_lengths(conversations)
        fitting = [j for j, n in enumerate(lengths) if self._fits_context(n)]
        if fitting:
            for j, reply in zip(fitting, self._generate([conversations[j] for j in fitting])):
                replies[j] = reply
        return replies

    # --- one group: answer, judge, give feedback, revise
    def _refine_group(self, group: list[_Question]) -> None:
        for item in group:
            item.next_prompt = prompts.student_answer_messages(item.question)
        active = list(group)
        for iteration in range(1, self.params.max_iterations + 1):
            written = [self.target.read(text)
                       for text in self._generate([item.next_prompt for item in active])]
            results = self._verdicts(active, [answer for answer, _ in written])
            wrong = []
            for item, (answer, chain), result in zip(active, written, results):
                attempt = _attempt(iteration, answer, chain)
                item.attempts.append(attempt)
                if result is None:  # empty: rejected without asking the teacher
                    attempt["verdict"] = EMPTY_VERDICT.model_dump()
                    attempt["judged_by"] = "empty_answer_rule"
                    wrong.append(item)
                    continue
                if not result.ok or not isinstance(result.parsed, Verdict):
                    attempt["error"] = item.error = result.error or "no verdict"
                    continue
                attempt["verdict"] = result.parsed.model_dump()
                if result.parsed.correct:
                    item.passed_at = iteration
                else:
                    wrong.append(item)
            if not wrong or iteration == self.params.max_iterations:
                break
            active = self._prepare_revisions(wrong)
            if not active:
                break

    def _verdicts(self, items: list[_Question], answers: list[str]) -> list[TeacherResult | None]:
        """The teacher's verdict on each non-empty answer; None for an empty one (nothing to judge,
        and nothing a row could be trained on)."""
        asked = [j for j, answer in enumerate(answers) if answer.strip()]
        self.empty_answers += len(answers) - len(asked)
        results: list[TeacherResult | None] = [None] * len(answers)
        if asked:
            replies = self.teacher.verdict([items[j].question for j in asked],
                                           [answers[j] for j in asked])
            for j, reply in zip(asked, replies):
                results[j] = reply
        return results

    def _prepare_revisions(self, wrong: list[_Question]) -> list[_Question]:
        """Attach the critic's feedback to each wrong answer and build its revision prompt; return
        those whose prompt fits the context (shortened if need be; the others stop revising)."""
        revising = []
        for item, feedback in zip(wrong, self.critic.feedback(wrong, self._ask_student)):
            prompt = None if feedback is None else self._fit_revision(item, feedback)
            if prompt is None:
                item.stopped_by_context = True
                continue
            item.attempts[-1]["feedback"] = feedback
            item.next_prompt = prompt
            revising.append(item)
        return revising

    def _fit_revision(self, item: _Question, feedback: str) -> list[dict] | None:
        """The revision prompt, with the previous answer and the feedback cut (ends marked
        ``[...]``) when question + answer + feedback + ``max_new_tokens`` exceed the context, as
        they easily do for a small model; None when even the shortest version does not fit."""
        previous = item.attempts[-1]["answer"]
        prompt = prompts.revision_messages(item.question, previous, feedback)
        n = self._prompt_lengths([prompt])[0]
        if self._fits_context(n):
            return prompt
        texts_tokens = len(self.tokenizer.encode(previous + feedback, add_special_tokens=False))
        keep = 1 - (n - (self.context - self.params.max_new_tokens)) / max(texts_tokens, 1)
        for _ in range(8):  # tokens ~ characters: a few proportional rounds converge
            if keep <= 0:
                return None
            prompt = prompts.revision_messages(item.question, _shorten(previous, keep),
                                               _shorten(feedback, keep))
            n = self._prompt_lengths([prompt])[0]
            if self._fits_context(n):
                item.attempts[-1]["revision_prompt_shortened"] = True
                self.revision_prompts_shortened += 1
                return prompt
            keep *= 0.85
        return None

    # --- the in-loop update
    def _update(self, rows: list[_Question]) -> None:
        index = len(self.updates) + 1
        seed = self.params.train.seed + index - 1  # a fresh shuffle per update, reproducibly
        train_params = self.params.train.model_copy(update={"seed": seed})
        before = weight_fingerprint(self.model)
        if not before:
            raise ValueError("the student has no trainable parameters; call make_trainable() first")
        if self.session is None:
            self.session = TrainSession(self.model, train_params)
        critiques = [c for r in rows for c in r.critique_examples]
        result = train(self.model, self.tokenizer, [r.example for r in rows] + critiques,
                       train_params, live=self.live, desc=f"refine update {index}",
                       session=self.session)
        # The published code "updates" on 10 samples with zero optimiser steps; refuse to do that.
        if result.steps < 1:
            raise RuntimeError(f"refine update {index} took no optimiser step on {len(rows)} rows")
        if weight_fingerprint(self.model) == before:
            raise RuntimeError(f"refine update {index} took {result.steps} steps but left the "
                               f"trainable weights unchanged (learning rates {result.lr_history}; "
                               "a warmup step has learning rate 0)")
        for row in rows:
            row.update = index
        self.updates.append({
            "update": index, "rows": len(rows), "critique_examples": len(critiques),
            "steps": result.steps,
            "first_loss": round(result.loss_history[0], 4),
            "final_loss": round(result.loss_history[-1], 4),
            "examples_used": result.data.get("examples_used", 0),
            "examples_truncated": result.data.get("examples_truncated", 0),
            "examples_with_eos": result.data.get("examples_with_eos", 0),
        })
        log.info("update %d: %d rows, %d steps, loss %.4f -> %.4f", index, len(rows), result.steps,
                 result.loss_history[0], result.loss_history[-1])


def refine(model, tokenizer, teacher: Teacher, inputs: Sequence[RefineInput], params: RefineParams,
           generation: GenerationParams, *, live=None) -> RefineRun:
    """Refine ``inputs`` with ``model`` (a trainable student, updated in place) and ``teacher``."""
    return Refiner(model, tokenizer, teacher, params, generation, live=live).run(inputs)
