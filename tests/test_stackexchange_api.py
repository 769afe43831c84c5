"""The Stack Exchange API client against a loopback server that speaks the API's JSON shapes."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from meteor.scrape.config import ApiParams
from meteor.scrape.api import StackExchangeClient, StackExchangeError, scrape_api

THROTTLE = (400, {"error_id": 502, "error_name": "throttle_violation",
                  "error_message": "too many requests from this IP, more requests available in "
                                   "13 seconds"})


def question(qid: int, tags: list[str], *, accepted: bool = True, **extra) -> dict:
    item = {"tags": tags, "owner": {"user_id": 7, "display_name": "asker"}, "is_answered": True,
            "view_count": 100, "answer_count": 2, "score": 4, "last_activity_date": 1700000000,
            "creation_date": 1600000000, "question_id": qid, "content_license": "CC BY-SA 4.0",
            "link": f"https://stackoverflow.com/questions/{qid}/slug",
            "title": f"Why does &quot;{qid}&quot; fail?",
            "body": f"<p>Question <code>{qid}</code></p>"}
    if accepted:
        item["accepted_answer_id"] = qid + 1
    return {**item, **extra}


class FakeStackExchange:
    """Serves /questions (paginated by tag) and /answers/{ids}; records every request."""

    def __init__(self, questions_by_tag: dict[str, list[dict]], *, quota: int = 300):
        self.questions_by_tag = questions_by_tag
        self.quota = quota
        self.scripted: list[tuple[int, dict]] = []  # served first, one per request
        self.backoff_on_request: dict[int, int] = {}  # request number -> backoff seconds
        self.deleted_answers: set[int] = set()  # answer ids /answers no longer returns
        self.events: list[tuple] = []  # ("GET", path, query) and, from the client, ("sleep", s)

    def respond(self, path: str, query: dict[str, str]) -> tuple[int, dict]:
        self.events.append(("GET", path, query))
        if self.scripted:
            return self.scripted.pop(0)
        self.quota -= 1
        if path == "/2.3/questions":
            items = self.questions_by_tag.get(query["tagged"], [])
        else:  # /2.3/answers/1;2;3
            ids = [int(i) for i in path.rsplit("/", 1)[1].split(";")]
            items = [{"owner": {"user_id": 9}, "is_accepted": True, "score": 10, "answer_id": i,
                      "question_id": i - 1, "content_license": "CC BY-SA 4.0",
                      "body": f"<p>Answer {i}: use <code>x &lt; y</code></p>"} for i in ids
                     if i not in self.deleted_answers]
        page, size = int(query["page"]), int(query["pagesize"])
        wrapper = {"items": items[(page - 1) * size: page * size],
                   "has_more": page * size < len(items), "quota_max": 300,
                   "quota_remaining": self.quota}
        if backoff := self.backoff_on_request.get(len(self.requests)):
            wrapper["backoff"] = backoff
        return 200, wrapper

    @property
    def requests(self) -> list[tuple[str, dict]]:
        return [(e[1], e[2]) for e in self.events if e[0] == "GET"]


@pytest.fixture
def serve():
    servers = []

    def start(fake: FakeStackExchange) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                status, body = fake.respond(url.path, query)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/2.3"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def client_for(fake: FakeStackExchange, base_url: str, key: str | None = "", **params):
    sleep = lambda seconds: fake.events.append(("sleep", seconds))  # noqa: E731
    return StackExchangeClient(ApiParams(base_url=base_url, **params), key=key, sleep=sleep)


def test_paginates_questions_and_fetches_accepted_answers_in_batches_of_100(serve):
    questions = [question(qid, ["pytorch", "python"]) for qid in range(1000, 3500, 10)]  # 250
    questions[3] = question(1030, ["pytorch"], accepted=False)
    questions[4] = question(1040, ["pytorch"], closed_date=1650000000, closed_reason="Duplicate")
    fake = FakeStackExchange({"pytorch": questions})
    client = client_for(fake, serve(fake), page_size=100)

    result = scrape_api({"DL": ["pytorch"]}, client=client)

    question_pages = [q for p, q in fake.requests if p == "/2.3/questions"]
    assert [(q["page"], q["pagesize"], q["tagged"], q["filter"], q["site"])
            for q in question_pages] == [
        (str(n), "100", "pytorch", "withbody", "stackoverflow") for n in (1, 2, 3)]
    answer_batches = [p.rsplit("/", 1)[1].split(";") for p, q in fake.requests
                      if p.startswith("/2.3/answers/")]
    assert [len(batch) for batch in answer_batches] == [98, 100, 50]
    assert all(q["filter"] == "withbody" for p, q in fake.requests if p.startswith("/2.3/answers/"))
    assert len(result.records) == 248
    assert dict(result.dropped) == {"no_accepted_answer": 1, "closed": 1}
    record = result.records[0]
    assert record == {
        "id": 1000, "category": "DL", "title": 'Why does "1000" fail?',
        "question": "Question `1000`", "answer": "Answer 1001: use `x < y`",
        "tags": ["pytorch", "python"], "score": 4, "link": "https://stackoverflow.com/q/1000"}


def test_a_duplicate_without_its_answer_does_not_displace_a_usable_copy(serve):
    same = {"title": "Same question?", "body": "<p>Same body</p>"}
    questions = [question(1000, ["pytorch"], score=9, **same),  # best score, answer deleted
                 question(1010, ["pytorch"], **same),
                 question(1020, ["pytorch"], title="same  question", body="<p>Same body.</p>"),
                 question(1030, ["pytorch"])]
    fake = FakeStackExchange({"pytorch": questions})
    fake.deleted_answers = {1001}
    client = client_for(fake, serve(fake), page_size=2)  # the copies come on two pages

    result = scrape_api({"DL": ["pytorch"]}, client=client)

    assert [r["id"] for r in result.records] == [1010, 1030]  # same score: the lower id
    assert dict(result.dropped) == {"no_usable_answer": 1, "duplicate": 1}


def test_max_pages_bounds_the_questions_fetched(serve):
    fake = FakeStackExchange({"nlp": [question(q, ["nlp"]) for q in range(10, 1000, 10)]})
    result = scrape_api({"NLP": ["nlp"]}, client=client_for(fake, serve(fake), page_size=20,
                                                             max_pages=2))
    assert len(result.records) == 40
    assert [q["page"] for p, q in fake.requests if p == "/2.3/questions"] == ["1", "2"]


def test_a_question_under_two_category_tags_is_fetched_once(serve):
    shared = question(500, ["nlp", "pytorch"])
    fake = FakeStackExchange({"pytorch": [shared], "nlp": [shared, question(600, ["nlp"])]})
    result = scrape_api({"DL": ["pytorch"], "NLP": ["nlp"]}, client=client_for(fake, serve(fake)))
    # Category by the table over all its tags (DL first), not by the tag it was found under.
    assert [(r["id"], r["category"]) for r in result.records] == [(500, "DL"), (600, "NLP")]
    assert not result.dropped


def test_backoff_is_honoured_before_the_next_request(serve):
    fake = FakeStackExchange({"keras": [question(q, ["keras"]) for q in range(10, 310, 10)]})
    fake.backoff_on_request[1] = 7  # the first response asks for 7 s of quiet
    client = client_for(fake, serve(fake), page_size=10)
    result = scrape_api({"DL": ["keras"]}, client=client)
    assert len(result.records) == 30
    kinds = [e[0] if e[0] == "GET" else e for e in fake.events]
    assert kinds[:3] == ["GET", ("sleep", 7.0), "GET"]
    assert kinds.count(("sleep", 7.0)) == 1


def test_throttle_violation_is_retried_after_the_announced_wait(serve):
    fake = FakeStackExchange({"nltk": [question(10, ["nltk"])]})
    fake.scripted = [THROTTLE]
    result = scrape_api({"NLP": ["nltk"]}, client=client_for(fake, serve(fake)))
    assert [r["id"] for r in result.records] == [10]
    events = [e[0] if e[0] == "GET" else e for e in fake.events]
    assert events[:3] == ["GET", ("sleep", 13.0), "GET"]


def test_http_429_and_5xx_are_retried_with_exponential_backoff(serve):
    fake = FakeStackExchange({"opencv": [question(10, ["opencv"])]})
    fake.scripted = [(503, {}), (429, {}), (500, {"error_id": 500, "error_name": "internal_error",
                                                  "error_message": "oops"})]
    result = scrape_api({"CV": ["opencv"]}, client=client_for(fake, serve(fake)))
    assert [r["id"] for r in result.records] == [10]
    assert [e[1] for e in fake.events if e[0] == "sleep"] == [1.0, 2.0, 4.0]


def test_gives_up_after_max_retries_naming_the_request(serve):
    fake = FakeStackExchange({})
    fake.scripted = [(503, {})] * 3
    client = client_for(fake, serve(fake), max_retries=2)
    with pytest.raises(StackExchangeError,
                       match=r"GET /questions failed after 3 attempts: HTTP 503"):
        scrape_api({"CV": ["opencv"]}, client=client)
    assert len(fake.requests) == 3


def test_a_bad_request_is_not_retried(serve):
    fake = FakeStackExchange({})
    fake.scripted = [(400, {"error_id": 400, "error_name": "bad_parameter",
                            "error_message": "site is required"})]
    with pytest.raises(StackExchangeError, match="bad_parameter: site is required"):
        scrape_api({"CV": ["opencv"]}, client=client_for(fake, serve(fake)))
    assert len(fake.requests) == 1


def test_stops_cleanly_when_the_quota_falls_below_min_quota(serve, caplog):
    fake = FakeStackExchange({"xgboost": [question(q, ["xgboost"]) for q in range(10, 410, 10)]},
                             quota=12)
    client = client_for(fake, serve(fake), page_size=10, min_quota=10)
    with caplog.at_level(logging.WARNING):
        result = scrape_api({"ML": ["xgboost"]}, client=client)
    # questions p1 (quota 11), answers (10), questions p2 (9): the answers of p2 would go below.
    assert [p.split("/")[2] for p, _ in fake.requests] == ["questions", "answers", "questions"]
    assert [r["id"] for r in result.records] == list(range(10, 110, 10))
    assert dict(result.dropped) == {"quota_exhausted": 10}
    assert "quota_remaining=9" in caplog.text


def test_key_from_the_environment_is_sent_but_never_logged(serve, monkeypatch, caplog):
    secret = "s3cr3t-app-key"
    monkeypatch.setenv("STACKEXCHANGE_KEY", secret)
    fake = FakeStackExchange({"spacy": [question(10, ["spacy"])]})
    fake.scripted = [THROTTLE, (400, {"error_id": 502, "error_name": "throttle_violation",
                                      "error_message": f"key {secret} is throttled"})]
    client = client_for(fake, serve(fake), key=None)
    with caplog.at_level(logging.DEBUG):
        result = scrape_api({"NLP": ["spacy"]}, client=client)
    assert len(result.records) == 1
    assert all(q["key"] == secret for _, q in fake.requests)
    assert "throttle_violation" in caplog.text and secret not in caplog.text
