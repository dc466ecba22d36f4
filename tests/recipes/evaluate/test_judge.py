"""The LLM-judge client against a local http.server playing an OpenAI-compatible endpoint (never the internet):
retries, timeouts, a refused port, both-order judging, and the resumable cache of finished judgments."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from recipes.evaluate.judge import ChatJudge, JudgeUnreachableError
from recipes.evaluate.metrics import WinTieLoss

TEMPLATE = "Question: {prompt}\n<A>{response_a}</A>\n<B>{response_b}</B>"


def prefer_longer(content: str) -> str:
    """A judge with a rule we can apply by hand: the longer answer wins; equal lengths tie."""
    a, b = (re.search(f"<{t}>(.*)</{t}>", content, re.DOTALL).group(1) for t in "AB")
    verdict = "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"
    return f"Answer A has {len(a)} characters, answer B {len(b)}. Verdict: {verdict}"


class Endpoint:
    """A chat-completions server in a thread. ``behaviour(n, content)`` gets the 1-based request number and the user
    message and returns ``(status, reply text)``; it may sleep to play a hanging server."""

    def __init__(self, behaviour):
        self.requests = 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests += 1
                    n = endpoint.requests
                status, text = behaviour(n, body["messages"][-1]["content"])
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def judge_at(url, tmp_path=None, **kwargs):
    kwargs = {"max_retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, "concurrency": 1, "api_key_env": None, **kwargs}
    cache = str(tmp_path / "cache.jsonl") if tmp_path is not None else None
    return ChatJudge(url, "test-judge", TEMPLATE, cache=cache, **kwargs)


PROMPTS = ["q1", "q2", "q3"]
POLICY = ["a long answer", "short", "same"]
BASELINE = ["short", "a long answer", "SAME"]  # by the longer-wins rule: win, loss, tie


def test_both_orders_by_hand_and_mirror():
    with Endpoint(lambda n, c: (200, prefer_longer(c))) as ep:
        judge = judge_at(ep.url)
        result = judge.compare(PROMPTS, POLICY, BASELINE)
        assert result.outcomes == [1, -1, 0] and result.result == WinTieLoss(1, 1, 1) and result.failed == 0
        assert ep.requests == 6  # 3 prompts x 2 orders
        assert judge.compare(PROMPTS, BASELINE, POLICY).result == result.result.mirrored()


def test_a_first_position_biased_judge_yields_only_ties():
    """A judge that always answers A agrees with itself in neither order, so no prompt is a win or a loss."""
    with Endpoint(lambda n, c: (200, "[[A]]")) as ep:
        result = judge_at(ep.url).compare(PROMPTS, POLICY, BASELINE)
    assert result.result == WinTieLoss(0, 3, 0)


def test_the_last_verdict_marker_wins_and_a_reply_without_one_fails():
    judge = judge_at("http://127.0.0.1:9/v1")
    assert judge.parse("Not [[A]]: on reflection [[B]]") == "B"
    with Endpoint(lambda n, c: (200, "I cannot decide.")) as ep:
        result = judge_at(ep.url, max_retries=1).compare(["q"], ["x"], ["y"])
    assert result.failed == 1 and result.result.n == 0 and ep.requests == 4  # 2 orders x 2 attempts
    assert "none of" in result.failures[0]["error"]


def test_an_endpoint_failing_twice_is_retried_then_answers(tmp_path):
    with Endpoint(lambda n, c: (500, "overloaded") if n <= 2 else (200, prefer_longer(c))) as ep:
        result = judge_at(ep.url, tmp_path).compare(["q"], ["longer"], ["short"])
    assert result.result == WinTieLoss(1, 0, 0) and result.failed == 0
    assert ep.requests == 4  # the first judgment took 3 attempts, the second 1


def test_failures_beyond_the_retries_are_counted_and_not_cached(tmp_path):
    with Endpoint(lambda n, c: (503, "down")) as ep:
        result = judge_at(ep.url, tmp_path, max_retries=2).compare(PROMPTS, POLICY, BASELINE)
    assert result.failed == 3 and result.result.n + result.failed == 3 and len(result.failures) == 6
    assert ep.requests == 6 * 3 and "HTTPError" in result.failures[0]["error"]
    assert not (tmp_path / "cache.jsonl").exists()


def test_a_hanging_endpoint_times_out(tmp_path):
    def hang(n, content):
        time.sleep(1.5)
        return 200, "[[A]]"

    with Endpoint(hang) as ep:
        start = time.monotonic()
        result = judge_at(ep.url, tmp_path, timeout_s=0.2, max_retries=1).compare(["q"], ["x"], ["y"])
        elapsed = time.monotonic() - start
    assert result.failed == 1 and len(result.failures) == 2
    assert all("timed out" in f["error"] for f in result.failures)
    assert elapsed < 1.4  # 2 judgments x 2 attempts x 0.2 s + backoff, far below one hang of 1.5 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_port_fails_with_a_message_naming_the_endpoint(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(JudgeUnreachableError, match=re.escape(url + "/chat/completions") + ".*unreachable"):
        judge_at(url, tmp_path, max_retries=1).compare(["q"], ["x"], ["y"])


def test_an_interrupted_run_resumes_from_the_cache(tmp_path):
    """Requests 1-3 are answered, later ones fail: 3 judgments are cached, 3 failed. A rerun on a healthy server asks
    only those 3, and ends with what one uninterrupted run gives; a third run needs no server at all."""
    with Endpoint(lambda n, c: (200, prefer_longer(c)) if n <= 3 else (500, "crash")) as ep:
        first = judge_at(ep.url, tmp_path, max_retries=0).compare(PROMPTS, POLICY, BASELINE)
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(first.failures) == 3
    assert {json.loads(line)["order"] for line in lines} <= {"ab", "ba"}
    with Endpoint(lambda n, c: (200, prefer_longer(c))) as ep:
        second = judge_at(ep.url, tmp_path).compare(PROMPTS, POLICY, BASELINE)
        assert ep.requests == 3 and second.cached == 3
    assert second.result == WinTieLoss(1, 1, 1) and second.failed == 0
    offline = judge_at(f"http://127.0.0.1:{free_port()}/v1", tmp_path).compare(PROMPTS, POLICY, BASELINE)
    assert offline.result == second.result and offline.cached == 6


def test_a_cut_off_last_cache_line_is_skipped_and_asked_again(tmp_path):
    with Endpoint(lambda n, c: (200, prefer_longer(c))) as ep:
        judge_at(ep.url, tmp_path).compare(["q"], ["longer"], ["short"])
        path = tmp_path / "cache.jsonl"
        path.write_text(path.read_text()[:-20])  # the second judgment's line is cut mid-write
        again = judge_at(ep.url, tmp_path).compare(["q"], ["longer"], ["short"])
        assert ep.requests == 3 and again.cached == 1 and again.result == WinTieLoss(1, 0, 0)
    assert all(json.loads(line) for line in path.read_text().splitlines()[2:])  # appends start on a fresh line


def test_a_template_without_the_responses_is_refused():
    with pytest.raises(ValueError, match="response_b"):
        ChatJudge("http://127.0.0.1:9/v1", "m", "Q: {prompt} A: {response_a}")
