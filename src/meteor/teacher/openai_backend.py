"""The ``openai`` backend: any OpenAI-compatible chat endpoint (OpenAI, Azure's /openai/v1,
vLLM, Ollama, ``transformers serve``) through the ``openai`` package.

- Key: ``OPENAI_API_KEY`` from the environment only; it is never logged or written anywhere.
  When it is unset, the placeholder ``"EMPTY"`` is sent (local servers ignore the key), except to
  api.openai.com, where a missing key is an error before any call.
- Endpoint: ``<section>.base_url``, else ``OPENAI_BASE_URL``; neither is an error naming
  ``<section>.base_url`` before any call.
- Fan-out: a thread pool of ``max_concurrency`` workers, results reported per item as each
  finishes (so the cache commits it at once) and returned in input order by the caller.
- Retries are ours only (the client's own are disabled with ``max_retries=0``, so every request
  sent is counted): 408/409/429/5xx, timeouts, connection errors and malformed response bodies
  are retried up to ``max_retries`` times with exponential backoff and jitter, waiting exactly
  what ``Retry-After`` / ``retry-after-ms`` asks when the server says. Other statuses (400, 401,
  404, ...) and empty replies fail the item at once: repeating the same request would not help.
- ``max_tokens`` is sent (not ``max_completion_tokens``): it is what OpenAI-compatible servers
  accept most widely.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
from openai.types.chat import ChatCompletion

from meteor.params import ParamsError
from meteor.teacher.config import TeacherParams
from meteor.teacher.chat import BUDGET, CallFailure, ChatBackend, Completion, Outcome

log = logging.getLogger(__name__)

PLACEHOLDER_KEY = "EMPTY"
RETRYABLE_STATUS = frozenset({408, 409, 429})
MAX_RETRY_AFTER_S = 300.0  # never sleep longer than this on a server's say-so


def resolve_base_url(params: TeacherParams, section: str = "teacher") -> str:
    """``<section>.base_url``, else ``$OPENAI_BASE_URL``; a clear error naming the key if neither."""
    url = params.base_url or os.environ.get("OPENAI_BASE_URL")
    if not url:
        raise ParamsError(
            f"{section}.base_url is not set and OPENAI_BASE_URL is empty: set {section}.base_url "
            "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1) for the openai backend")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ParamsError(f"{section}.base_url: {url!r} is not an http(s) URL")
    return url


def resolve_api_key(base_url: str) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if urlparse(base_url).hostname == "api.openai.com":
        raise ParamsError("OPENAI_API_KEY is not set in the environment; api.openai.com needs it")
    log.info("OPENAI_API_KEY is not set: sending the placeholder key %r to %s", PLACEHOLDER_KEY,
             base_url)
    return PLACEHOLDER_KEY


def retry_after_s(headers) -> float | None:
    """Seconds the server asks us to wait (``retry-after-ms``, ``Retry-After`` seconds or date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: fall back to our own backoff
    return max(0.0, when.timestamp() - time.time())


class _MalformedReply(Exception):
    """A 200 response without choices: retried like a 5xx."""


class OpenAIBackend(ChatBackend):
    kind = "openai"

    def __init__(
        self,
        params: TeacherParams,
        *,
        section: str = "teacher",
        sleep: Callable[[float], None] = time.sleep,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
    ):
        if params.model == "offline-reference":
            raise ParamsError(f"{section}.model: 'offline-reference' is the offline backend's "
                              f"placeholder; set {section}.model to the served model name")
        self.params = params
        self.model = params.model
        self.base_url = resolve_base_url(params, section)
        self._sleep = sleep  # injectable: tests record the waits instead of sleeping
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self.client = openai.OpenAI(api_key=resolve_api_key(self.base_url), base_url=self.base_url,
                                    timeout=params.timeout_s, max_retries=0)

    @property
    def identity(self) -> str:
        """The resolved endpoint: the same model name on two servers is two cache entries."""
        return self.base_url.rstrip("/")

    def complete(
        self,
        conversations: Sequence[list[dict]],
        *,
        json_mode: bool,
        may_send: Callable[[], bool],
        on_done: Callable[[int, Outcome], None],
    ) -> None:
        workers = min(self.params.max_concurrency, len(conversations))
        if workers <= 1:
            for i, conv in enumerate(conversations):
                on_done(i, self._complete_one(conv, json_mode, may_send))
            return

        def task(i: int) -> None:
            on_done(i, self._complete_one(conversations[i], json_mode, may_send))

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher")
        try:
            for future in [pool.submit(task, i) for i in range(len(conversations))]:
                future.result()  # re-raise a bug in a worker here, in the caller
        finally:
            # On Ctrl-C or a bug, drop queued requests instead of sending them.
            pool.shutdown(wait=True, cancel_futures=True)

    def _backoff(self, attempt: int, server_wait: float | None) -> float:
        if server_wait is not None:
            return min(server_wait, MAX_RETRY_AFTER_S)
        cap = min(self._backoff_max_s, self._backoff_base_s * 2 ** attempt)
        return cap * self._rng.uniform(0.5, 1.0)  # jitter: retries of many workers spread out

    def _complete_one(self, messages: list[dict], json_mode: bool,
                      may_send: Callable[[], bool]) -> Outcome:
        extra = {"response_format": {"type": "json_object"}} if json_mode else {}
        attempts = 0
        reason = "no attempt"
        for attempt in range(self.params.max_retries + 1):
            if not may_send():
                return CallFailure(BUDGET, attempts)
            attempts += 1
            server_wait = None
            try:
                # The SDK's documented raw `post` with the typed reply: it skips
                # `chat.completions.create`'s recursive re-typing of every message, about a third
                # of our CPU per call, which bounds throughput at high concurrency (the GIL).
                # The body is plain JSON already.
                resp = self.client.post("/chat/completions", cast_to=ChatCompletion, body={
                    "model": self.model, "messages": messages,
                    "temperature": self.params.temperature, "max_tokens": self.params.max_tokens,
                    **extra})
                if not resp.choices:
                    raise _MalformedReply("reply has no choices")
                choice = resp.choices[0]
                if not (choice.message.content or "").strip():
                    # Deterministic (length limit, content filter): asking again would not help.
                    return CallFailure(f"empty reply (finish_reason={choice.finish_reason})",
                                       attempts)
                usage = {}
                if resp.usage is not None:
                    usage = {"prompt_tokens": int(resp.usage.prompt_tokens or 0),
                             "completion_tokens": int(resp.usage.completion_tokens or 0)}
                return Completion(choice.message.content, usage, attempts=attempts)
            except openai.APIStatusError as e:
                status = e.status_code
                if status not in RETRYABLE_STATUS and status < 500:
                    return CallFailure(f"HTTP {status}: {_short(e.message)}", attempts)
                reason = f"HTTP {status}"
                server_wait = retry_after_s(e.response.headers)
            except openai.APITimeoutError:
                reason = f"timeout after {self.params.timeout_s:g}s"
            except openai.APIConnectionError as e:
                reason = f"connection error: {_short(str(e))}"
            except (openai.APIResponseValidationError, _MalformedReply, ValueError) as e:
                # ValueError covers a 200 whose body is not JSON (the client fails to decode it).
                reason = f"malformed response: {_short(str(e))}"
            if attempt < self.params.max_retries:
                delay = self._backoff(attempt, server_wait)
                log.debug("retrying in %.2fs after %s", delay, reason)
                self._sleep(delay)
        return CallFailure(f"{reason} after {attempts} attempts", attempts)

    def close(self) -> None:
        self.client.close()


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
