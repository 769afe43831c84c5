"""Stack Exchange API v2.3 client: questions per category tag, then their accepted answers by id.

Follows the API's rules (https://api.stackexchange.com/docs/throttle): wait ``backoff`` seconds
before the next request when a response carries it; retry throttle errors (HTTP 400 with
``error_id`` 502 ``throttle_violation``), HTTP 429 and 5xx with backoff; stop cleanly, keeping what
was fetched, once ``quota_remaining`` falls below ``scrape.api.min_quota``. An app key raises the
daily quota; it is read from ``$STACKEXCHANGE_KEY`` only and never logged or written anywhere.

Records and drop reasons are the same as for the dump source (meteor.scrape.records).
"""

from __future__ import annotations

import html
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import requests

from meteor.scrape.config import ApiParams
from meteor.scrape import records as R
from meteor.scrape.categories import CategoryTable, parse_tags

log = logging.getLogger(__name__)

# urllib3 logs full request URLs, query string (and so the key) included, at DEBUG.
logging.getLogger("urllib3").setLevel(logging.INFO)

THROTTLE_ERROR_ID = 502
RETRY_HTTP_STATUS = frozenset({429, 500, 502, 503, 504})
IDS_PER_REQUEST = 100  # the API's limit for vectorised ids like /answers/1;2;3
QUOTA_EXHAUSTED = "quota_exhausted"  # candidates whose answers could not be fetched any more
_AVAILABLE_IN = re.compile(r"available in (\d+) seconds")


class StackExchangeError(RuntimeError):
    """A request failed for good (not retryable, or out of retries)."""


class QuotaExhausted(StackExchangeError):
    """Another request would take the quota below ``min_quota``."""


class StackExchangeClient:
    def __init__(
        self,
        params: ApiParams,
        *,
        key: str | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.params = params
        self._key = key if key is not None else os.environ.get("STACKEXCHANGE_KEY") or None
        self._session = session or requests.Session()
        self._sleep = sleep  # injectable so tests do not really wait
        self._backoff_s = 0.0
        self.quota_remaining: int | None = None
        self.requests_sent = 0

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def get(self, path: str, **query: Any) -> dict:
        """One API call, retried on throttling and server errors; returns the response wrapper."""
        if self.quota_remaining is not None and self.quota_remaining < self.params.min_quota:
            raise QuotaExhausted(f"API quota_remaining={self.quota_remaining} is below "
                                 f"scrape.api.min_quota={self.params.min_quota}")
        query = {"site": self.params.site, **query}
        if self._key:
            query["key"] = self._key
        url = f"{self.params.base_url.rstrip('/')}/{path}"
        problem = ""
        for attempt in range(self.params.max_retries + 1):
            if self._backoff_s:
                log.info("API asked for a backoff: waiting %.0f s", self._backoff_s)
                self._sleep(self._backoff_s)
                self._backoff_s = 0.0
            wait = min(2.0**attempt, 60.0)  # exponential backoff unless the server says better
            try:
                response = self._session.get(url, params=query, timeout=self.params.timeout_s)
            except requests.RequestException as e:  # connection reset, timeout, ...
                problem = f"{type(e).__name__}: {self._redact(str(e))}"
            else:
                self.requests_sent += 1
                try:
                    data = response.json()
                except ValueError:
                    data = {}
                ok = response.status_code == 200 and isinstance(data, dict)
                if ok and "error_id" not in data:
                    self.quota_remaining = data.get("quota_remaining", self.quota_remaining)
                    self._backoff_s = float(data.get("backoff") or 0)
                    return data
                data = data if isinstance(data, dict) else {}
                error = f"HTTP {response.status_code} {data.get('error_name', '')}".strip()
                message = self._redact(str(data.get("error_message", response.reason or "")))
                problem = f"{error}: {message}"
                throttled = data.get("error_id") == THROTTLE_ERROR_ID
                if not throttled and response.status_code not in RETRY_HTTP_STATUS:
                    raise StackExchangeError(f"GET /{path} failed: {problem}")
                if m := _AVAILABLE_IN.search(message):  # "more requests available in 24 seconds"
                    wait = float(m.group(1))
                elif (retry_after := response.headers.get("Retry-After", "")).isdigit():
                    wait = float(retry_after)
            if attempt < self.params.max_retries:
                log.warning("GET /%s: %s; retry %d/%d in %.0f s", path, problem, attempt + 1,
                            self.params.max_retries, wait)
                self._sleep(wait)
        raise StackExchangeError(
            f"GET /{path} failed after {self.params.max_retries + 1} attempts: {problem}")

    def pages(self, path: str, *, page_size: int, max_pages: int | None, **query: Any
              ) -> Iterator[list[dict]]:
        """The ``items`` of each page, following ``has_more``, for at most ``max_pages`` pages."""
        page = 1
        while max_pages is None or page <= max_pages:
            data = self.get(path, page=page, pagesize=page_size, **query)
            yield data.get("items", [])
            if not data.get("has_more"):
                return
            page += 1

    def questions(self, tag: str) -> Iterator[list[dict]]:
        """Pages of the highest-voted questions with this tag, bodies included."""
        return self.pages("questions", page_size=self.params.page_size,
                          max_pages=self.params.max_pages, tagged=tag, filter="withbody",
                          sort="votes", order="desc")

    def answers(self, answer_ids: list[int]) -> list[dict]:
        """Answers by id, bodies included, in requests of up to 100 ids."""
        items: list[dict] = []
        for start in range(0, len(answer_ids), IDS_PER_REQUEST):
            ids = ";".join(str(i) for i in answer_ids[start:start + IDS_PER_REQUEST])
            for page in self.pages(f"answers/{ids}", page_size=IDS_PER_REQUEST, max_pages=None,
                                   filter="withbody", sort="creation", order="asc"):
                items.extend(page)
        return items


def _question_fields(item: Mapping[str, Any]) -> tuple[int, str, str, list[str], int]:
    """(id, title, body, tags, score) of an API question; ``ValueError`` when a field is bad."""
    qid, title, body, score = (item.get(k) for k in ("question_id", "title", "body", "score"))
    if not (isinstance(qid, int) and isinstance(title, str) and isinstance(body, str)
            and isinstance(score, int) and isinstance(item.get("tags"), list)):
        raise ValueError(f"question item lacks a field: {sorted(item)}")
    return qid, html.unescape(title), body, parse_tags(item["tags"]), score  # titles come escaped


def scrape_api(
    categories: Mapping[str, list[str]],
    *,
    min_score: int = 0,
    client: StackExchangeClient,
) -> R.ScrapeResult:
    """Fetch every category tag's questions page by page, pairing each page with its answers."""
    table = CategoryTable(categories)
    result = R.ScrapeResult(source="api")
    seen: set[int] = set()  # a question fetched under two tags is the same row: take it once
    try:
        for tag in table.tags:
            for items in client.questions(tag):
                candidates = _select(items, table, min_score, seen, result)
                if not candidates:
                    continue
                try:
                    answers = client.answers([q["accepted_answer_id"] for q in candidates.values()])
                except QuotaExhausted:
                    result.dropped[QUOTA_EXHAUSTED] += len(candidates)
                    raise
                _pair(candidates, answers, table, result, site=client.params.site)
    except QuotaExhausted as e:
        log.warning("%s: stopping cleanly with %d records", e, len(result.records))
    log.info("API: %d requests, quota_remaining=%s", client.requests_sent, client.quota_remaining)
    # Last, among finished records: a copy without a usable answer never displaces a good one.
    result.records = R.drop_duplicates(result.records, result.dropped)
    result.records.sort(key=lambda r: r["id"])
    return result


def _select(items, table, min_score, seen, result) -> dict[int, dict]:
    """The page's questions that pass every rule, by id; the others are counted by reason."""
    candidates = {}
    for item in items:
        result.rows_read += 1
        try:
            qid, title, body, tags, score = _question_fields(item)
        except ValueError:
            result.dropped[R.MALFORMED] += 1
            continue
        if qid in seen:
            continue
        seen.add(qid)
        accepted = item.get("accepted_answer_id")
        reason = R.question_drop_reason(
            title=title, body=body, category=table.categorize(tags),
            has_accepted_answer=isinstance(accepted, int), score=score, min_score=min_score,
            closed="closed_date" in item,
        )
        if reason:
            result.dropped[reason] += 1
        else:
            candidates[qid] = item
    return candidates


def _pair(candidates: dict[int, dict], answers: list[dict], table: CategoryTable,
          result: R.ScrapeResult, *, site: str) -> None:
    answer_body = {}
    for answer in answers:
        qid, body = answer.get("question_id"), answer.get("body")
        if qid in candidates and answer.get("answer_id") == candidates[qid]["accepted_answer_id"]:
            if not isinstance(body, str):
                result.dropped[R.ANSWER_MALFORMED] += 1
            elif reason := R.answer_drop_reason(body):
                result.dropped[reason] += 1
            else:
                answer_body[qid] = body
        else:
            result.unused_answers += 1
    for qid, item in candidates.items():
        if qid not in answer_body:  # deleted since, or dropped above
            result.dropped[R.NO_USABLE_ANSWER] += 1
            continue
        _, title, body, tags, score = _question_fields(item)
        result.records.append(R.make_record(
            question_id=qid, category=table.categorize(tags), title=title, question_html=body,
            answer_html=answer_body[qid], tags=tags, score=score,
            link=None if site == "stackoverflow" else item.get("link"),
        ))
