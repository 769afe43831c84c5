"""A teacher/judge on top of any chat backend (``openai`` endpoint or ``local`` HF model).

:class:`ChatTeacher` turns question records into chat messages (:mod:`meteor.prompts`), serves
what it can from the persistent cache, sends the misses through a :class:`ChatBackend`, validates
structured replies (:class:`Verdict`, :class:`Scores`) and re-asks when they do not validate, and
keeps the accounting in :attr:`stats`. Every item comes back: a result that could not be obtained
is ``ok=False`` with the reason (``"budget"``, ``"HTTP 500 after 6 attempts"``, ``"invalid JSON
after 3 replies: ..."``), never an exception that kills the stage halfway.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError
from tqdm.auto import tqdm

from meteor.criteria import CRITERIA
from meteor.teacher import prompts
from meteor.teacher.config import TeacherParams
from meteor.teacher.base import Comparison, Scores, Teacher, TeacherResult, TeacherStats, Verdict
from meteor.teacher.cache import ResponseCache, cache_key, teacher_cache_dir

log = logging.getLogger(__name__)

BUDGET = "budget"  # failure reason of items left unsent because the budget was spent
JSON_FORMAT = "json_object"


# ------------------------------------------------------------------------------ backend contract
@dataclass
class Completion:
    """One reply: text and token usage; ``attempts`` counts requests sent (retries included)."""

    text: str
    usage: dict[str, int] = field(default_factory=dict)
    attempts: int = 1
    cached: bool = False


@dataclass
class CallFailure:
    """A conversation that got no reply, with the reason and the requests spent trying."""

    reason: str
    attempts: int = 0


Outcome = Completion | CallFailure


class ChatBackend(ABC):
    """Sends chat conversations to a model. Implementations own batching / concurrency / retries."""

    kind: str  # "openai" | "local": part of the cache key
    model: str

    @property
    def identity(self) -> str | None:
        """Who answers beyond ``kind`` and ``model`` (part of the cache key): an endpoint URL,
        a model revision. Computed once per backend."""
        return None

    @abstractmethod
    def complete(
        self,
        conversations: Sequence[list[dict]],
        *,
        json_mode: bool,
        may_send: Callable[[], bool],
        on_done: Callable[[int, Outcome], None],
    ) -> None:
        """Reply to every conversation; call ``on_done(index, outcome)`` exactly once per index,
        as soon as that reply is known (from any thread), so the caller can commit it at once.
        Before sending each request, check ``may_send()``; when it is False, report
        ``CallFailure(BUDGET, attempts)`` instead of sending."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and models."""


# ---------------------------------------------------------------------------- structured replies
_FENCE_OPEN = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _fenced_candidates(text: str) -> list[str]:
    """Bodies of fenced blocks, each from an opening fence to a later ``` (the longest first, so
    a JSON string holding its own ```python fence is not cut at the inner fence)."""
    out = []
    for opening in _FENCE_OPEN.finditer(text):
        start = opening.end()
        ends = [m.start() for m in re.finditer("```", text[start:])]
        out += [text[start:start + e].strip() for e in reversed(ends)]
    return out


def extract_json(text: str) -> str:
    """The JSON part of a reply: the whole reply when it parses as JSON (a verdict whose feedback
    quotes code fences is still whole), else the body of a fenced block that parses, else the
    outermost ``{...}`` span. When nothing parses, the best guess is returned, so validation
    names the error."""
    stripped = text.strip()
    if _is_json(stripped):
        return stripped
    fenced = _fenced_candidates(text)
    start, end = text.find("{"), text.rfind("}")
    braces = text[start:end + 1] if start != -1 and end > start else None
    for candidate in [*fenced, braces]:
        if candidate is not None and _is_json(candidate):
            return candidate
    if braces is not None:
        return braces
    return fenced[-1] if fenced else stripped


def _short_validation_error(err: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in err.errors()[:limit]:
        loc = ".".join(str(p) for p in e["loc"]) or "reply"
        parts.append(f"{loc}: {e['msg']}")
    more = len(err.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_structured(text: str, schema: type[BaseModel]) -> BaseModel:
    """Validate ``text`` against ``schema``; raise ValueError with a message fit to re-ask with."""
    try:
        return schema.model_validate_json(extract_json(text))
    except ValidationError as e:
        raise ValueError(_short_validation_error(e)) from None


def check_criteria(scores: Scores, criteria: tuple[str, ...]) -> Scores:
    """Keep exactly the requested criteria (case-insensitive names); a missing one is an error."""
    by_name = {name.strip().lower(): s for name, s in scores.scores.items()}
    missing = [c for c in criteria if c not in by_name]
    if missing:
        raise ValueError(f"missing criteria {missing}; score every one of {list(criteria)}")
    return Scores(scores={c: by_name[c] for c in criteria})


def check_preferences(comparison: Comparison, criteria: tuple[str, ...]) -> Comparison:
    """Like :func:`check_criteria`, for a pairwise :class:`Comparison`."""
    by_name = {name.strip().lower(): p for name, p in comparison.preferences.items()}
    missing = [c for c in criteria if c not in by_name]
    if missing:
        raise ValueError(f"missing criteria {missing}; judge every one of {list(criteria)}")
    return Comparison(preferences={c: by_name[c] for c in criteria})


# --------------------------------------------------------------------------------------- teacher
class ChatTeacher(Teacher):
    """Teacher/judge over a chat backend, with cache, JSON validation + re-ask and a budget.

    Budget: before each request, if the spend (from the token usage and ``prices``) has reached
    ``budget_usd``, the item fails with reason ``"budget"`` instead. With a ``budget_scope``
    (``"<stage>/<section>"``, set by the stage) the spend is cumulative: every call's cost is
    added to a ledger in the cache database at once, the budget counts what all runs of the stage
    spent since it last completed (:meth:`stage_completed` clears the ledger), so re-running a
    stopped or crashed stage cannot spend the budget again. Without a scope it is this run's
    spend only. Requests already in flight still finish, so the spend can exceed the budget by at
    most ``max_concurrency`` requests. Cache hits are free, so re-running with a larger budget
    resumes.
    """

    def __init__(self, params: TeacherParams, backend: ChatBackend, *,
                 cache: ResponseCache | None = None, progress: bool = True,
                 budget_scope: str | None = None):
        self.params = params
        self.backend = backend
        self.cache = cache if cache is not None else ResponseCache(teacher_cache_dir(params.cache_dir))
        self.name = f"{backend.kind}:{params.model}"
        self.budget_scope = budget_scope
        self.stats = TeacherStats(budget_usd=params.budget_usd, budget_scope=budget_scope)
        if budget_scope is not None:
            self.stats.spent_before_run_usd = self.cache.spent(budget_scope)
        self.progress = progress
        self._lock = threading.Lock()  # stats are updated from backend worker threads
        self._budget_logged = False
        self._price = params.prices.get(params.model)
        if params.budget_usd is not None and self._price is None:
            log.warning("%s: no price for model %r in prices; the budget of %.2f USD cannot be "
                        "enforced (calls are counted as free)", self.name, params.model,
                        params.budget_usd)

    # --- the Teacher interface
    def answer(self, questions: list[dict], guidelines: list[str | None]) -> list[TeacherResult]:
        _same_length(questions=questions, guidelines=guidelines)
        conversations = [prompts.teacher_answer_messages(q, g) for q, g in zip(questions, guidelines)]
        return self.complete(conversations)

    def verdict(self, questions: list[dict], answers: list[str]) -> list[TeacherResult]:
        _same_length(questions=questions, answers=answers)
        conversations = [prompts.verdict_messages(q, a) for q, a in zip(questions, answers)]
        return self.complete(conversations, schema=Verdict)

    def score(self, questions: list[dict], answers: list[str],
              criteria: tuple[str, ...] = CRITERIA) -> list[TeacherResult]:
        _same_length(questions=questions, answers=answers)
        criteria = tuple(criteria)
        conversations = [prompts.score_messages(q, a, criteria) for q, a in zip(questions, answers)]
        return self.complete(conversations, schema=Scores,
                             check=lambda s: check_criteria(s, criteria))

    def compare(self, questions: list[dict], answers_a: list[str], answers_b: list[str],
                criteria: tuple[str, ...] = CRITERIA) -> list[TeacherResult]:
        _same_length(questions=questions, answers_a=answers_a, answers_b=answers_b)
        criteria = tuple(criteria)
        conversations = [prompts.compare_messages(q, a, b, criteria)
                         for q, a, b in zip(questions, answers_a, answers_b)]
        return self.complete(conversations, schema=Comparison,
                             check=lambda c: check_preferences(c, criteria))

    def stage_completed(self) -> None:
        """The stage finished: its next run starts a fresh budget (clears the spend ledger)."""
        if self.budget_scope is not None:
            self.cache.clear_spend(self.budget_scope)

    def close(self) -> None:
        self.backend.close()
        self.cache.close()

    # --- the machinery
    def complete(
        self,
        conversations: Sequence[list[dict]],
        *,
        schema: type[BaseModel] | None = None,
        check: Callable[[BaseModel], BaseModel] | None = None,
        sample_index: int = 0,
    ) -> list[TeacherResult]:
        """One result per conversation, in order. With a ``schema``, the reply must validate
        (then pass ``check``); an invalid reply is re-asked up to ``json_retries`` times with the
        validation error appended to the conversation. ``sample_index`` tells apart several
        samples of the same conversation in the cache."""
        n = len(conversations)
        results: list[TeacherResult | None] = [None] * n
        convs = [list(c) for c in conversations]
        usage = [{"prompt_tokens": 0, "completion_tokens": 0} for _ in range(n)]
        all_cached = [True] * n
        pending = list(range(n))
        rounds = 1 + (self.params.json_retries if schema is not None else 0)

        for round_index in range(rounds):
            outcomes = self._call_round([convs[i] for i in pending], json_mode=schema is not None,
                                        sample_index=sample_index)
            retry = []
            for i, out in zip(pending, outcomes):
                if isinstance(out, CallFailure):
                    results[i] = TeacherResult(ok=False, error=out.reason, usage=usage[i])
                    continue
                for k in usage[i]:
                    usage[i][k] += int(out.usage.get(k, 0))
                all_cached[i] &= out.cached
                if schema is None:
                    ok = bool(out.text.strip())
                    results[i] = TeacherResult(ok=ok, text=out.text, error=None if ok else "empty reply",
                                               cached=all_cached[i], usage=usage[i])
                    continue
                try:
                    parsed = parse_structured(out.text, schema)
                    if check is not None:
                        parsed = check(parsed)
                except ValueError as e:
                    if round_index + 1 < rounds:
                        convs[i] += [{"role": "assistant", "content": out.text},
                                     prompts.json_reask_message(str(e))]
                        retry.append(i)
                    else:
                        results[i] = TeacherResult(
                            ok=False, text=out.text, cached=all_cached[i], usage=usage[i],
                            error=f"invalid JSON after {round_index + 1} replies: {e}")
                    continue
                results[i] = TeacherResult(ok=True, text=out.text, parsed=parsed,
                                           cached=all_cached[i], usage=usage[i])
            pending = retry
            if not pending:
                break

        failed = sum(not r.ok for r in results)
        with self._lock:
            self.stats.failures += failed
        if failed:
            reasons = sorted({(r.error or "").split(":")[0] for r in results if not r.ok})
            log.warning("%s: %d/%d items failed (%s)", self.name, failed, n, ", ".join(reasons))
        return results  # type: ignore[return-value]

    def _may_send(self) -> bool:
        budget = self.params.budget_usd
        if budget is None:
            return True
        if self.budget_scope is not None:  # read the ledger: another run may share the scope
            spent = self.cache.spent(self.budget_scope)
        else:
            with self._lock:
                spent = self.stats.cost_usd
        if spent < budget:
            return True
        if not self._budget_logged:
            self._budget_logged = True
            log.warning("%s: budget of %.4f USD reached (spent %.4f); remaining items fail with "
                        "reason 'budget' - re-run with a larger budget to continue from the cache",
                        self.name, budget, spent)
        return False

    def _cost(self, usage: dict[str, int]) -> float:
        if self._price is None:
            return 0.0
        return (usage.get("prompt_tokens", 0) * self._price.get("input", 0.0)
                + usage.get("completion_tokens", 0) * self._price.get("output", 0.0)) / 1e6

    def _call_round(self, conversations: list[list[dict]], *, json_mode: bool,
                    sample_index: int) -> list[Outcome]:
        """Cache hits first; the misses go to the backend and are committed as each finishes."""
        response_format = JSON_FORMAT if (json_mode and self.params.json_mode) else None
        endpoint = self.backend.identity
        keys = [
            cache_key(backend=self.backend.kind, model=self.params.model, messages=c,
                      temperature=self.params.temperature, max_tokens=self.params.max_tokens,
                      response_format=response_format, sample_index=sample_index,
                      endpoint=endpoint)
            for c in conversations
        ]
        outcomes: list[Outcome | None] = [None] * len(conversations)
        misses = []
        for j, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is None:
                misses.append(j)
            else:
                outcomes[j] = Completion(hit.text, hit.usage, attempts=0, cached=True)
        with self._lock:
            self.stats.cache_hits += len(conversations) - len(misses)
        if not misses:
            return outcomes  # type: ignore[return-value]

        bar = tqdm(total=len(misses), desc=f"{self.name} calls", unit="call",
                   disable=not self.progress, leave=False)

        def on_done(m: int, out: Outcome) -> None:
            j = misses[m]
            paid = out
            if isinstance(out, Completion) and out.text.strip():
                # Commit before anything else: a kill right after this line loses nothing.
                # Empty replies are not kept, so a re-run asks again. If another process stored
                # a reply for this key first, use that one: a reply in use is never replaced.
                stored = self.cache.put(keys[j], out.text, out.usage, backend=self.backend.kind,
                                        model=self.params.model)
                if stored.text != out.text:
                    out = Completion(stored.text, stored.usage, attempts=out.attempts, cached=True)
            cost = self._cost(paid.usage) if isinstance(paid, Completion) else 0.0
            if cost and self.budget_scope is not None:
                self.cache.add_spend(self.budget_scope, cost)
            with self._lock:
                self.stats.calls += paid.attempts
                if isinstance(paid, Completion):
                    self.stats.prompt_tokens += int(paid.usage.get("prompt_tokens", 0))
                    self.stats.completion_tokens += int(paid.usage.get("completion_tokens", 0))
                    self.stats.cost_usd += cost
            outcomes[j] = out
            bar.update(1)

        try:
            self.backend.complete([conversations[j] for j in misses], json_mode=response_format is not None,
                                  may_send=self._may_send, on_done=on_done)
        finally:
            bar.close()
        missing = [j for j in misses if outcomes[j] is None]
        if missing:  # a backend bug, not a bad item: say so loudly but keep every item accounted for
            log.error("%s: backend returned no outcome for %d conversations", self.name, len(missing))
            for j in missing:
                outcomes[j] = CallFailure("backend returned no outcome")
        return outcomes  # type: ignore[return-value]


def _same_length(**lists: list) -> None:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lists must have the same length, got {lengths}")
