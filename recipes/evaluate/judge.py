"""An LLM judge reached through an OpenAI-compatible chat-completions endpoint (standard library only): pairwise
verdicts in both orders, retries with exponential backoff, a timeout per request, and a JSONL cache of finished
judgments so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from recipes.evaluate.metrics import WinTieLoss, both_orders_outcome, count_outcomes

log = logging.getLogger(__name__)

ORDERS = ("ab", "ba")  # "ab": the policy's response is shown as A; "ba": the baseline's is


class JudgeError(RuntimeError):
    """One judgment failed (HTTP error, timeout, unreadable reply) after its retries; counted, never cached."""


class JudgeUnreachableError(JudgeError):
    """The endpoint could not be connected to at all: the run stops (finished judgments are already cached)."""


@dataclass
class JudgeComparison:
    """A policy judged against a baseline on ``n`` prompts, each in both orders.

    Fields:
        outcomes: per prompt, +1 (policy better in both orders), -1 (baseline better in both), 0 (tie or the two
            orders disagree), ``None`` (a judgment failed).
        result: `WinTieLoss` of the decided prompts; ``result.n + failed == n``.
        failed: prompts without a verdict; ``failures`` holds ``{"index", "order", "error"}`` per failed judgment.
        cached: judgments read from the cache instead of asked.
    """

    outcomes: list[int | None]
    result: WinTieLoss
    failed: int
    failures: list[dict[str, object]] = field(default_factory=list)
    cached: int = 0

    def as_dict(self) -> dict[str, object]:
        return {**self.result.as_dict(), "failed": self.failed, "cached": self.cached, "failures": self.failures}


class ChatJudge:
    """Pairwise LLM judge over an OpenAI-compatible ``POST {base_url}/chat/completions``.

    Each pair is judged twice, the policy's response shown first (``ab``) and second (``ba``); the prompt's outcome
    follows `recipes.evaluate.metrics.both_orders_outcome`, so a judge's position bias shows up as ties. A verdict is
    the marker (``verdicts``) that occurs last in the reply. Finished judgments are appended (and flushed) to ``cache``,
    keyed by the judge's identity (model, system prompt, template) and ``(prompt, a, b, order)``; a rerun asks only
    what is missing. Timeouts, HTTP errors and replies without a verdict are retried ``max_retries`` times with
    backoff ``backoff_s * 2**attempt``, then counted as failures; an endpoint that refuses connections raises
    `JudgeUnreachableError` naming it.

    Example::

        judge = ChatJudge("http://localhost:8000/v1", "my-judge", cache="judge_cache.jsonl")
        judge.compare(["Q?"], ["policy answer"], ["baseline answer"]).result  # WinTieLoss(win=1, tie=0, loss=0)

    Args:
        base_url: the endpoint root, e.g. ``https://api.openai.com/v1`` or a local vLLM server's ``/v1``.
        model: the model name sent in each request.
        template: the user message; ``{prompt}``, ``{response_a}``, ``{response_b}`` are filled in.
        system_prompt: the system message (empty: none is sent).
        verdicts: the reply markers for ``A`` better, ``B`` better and ``tie``.
        api_key_env: environment variable holding the API key (sent as a Bearer token when set).
        cache: JSONL file of finished judgments (``None``: no cache).
        concurrency: requests in flight at once.
    """

    def __init__(self, base_url: str, model: str, template: str, system_prompt: str = "",
                 verdicts: Mapping[str, str] | None = None, temperature: float = 0.0, max_tokens: int = 512,
                 timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0, cache: str | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY", concurrency: int = 4) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.template, self.system_prompt = model, template, system_prompt
        self.verdicts = dict(verdicts or {"A": "[[A]]", "B": "[[B]]", "tie": "[[C]]"})
        if set(self.verdicts) != {"A", "B", "tie"}:
            raise ValueError(f"judge.verdicts needs exactly the keys A, B, tie; got {sorted(self.verdicts)}.")
        for key in ("{prompt}", "{response_a}", "{response_b}"):
            if key not in template:
                raise ValueError(f"judge.template lacks {key}: the judge would not see what it judges.")
        self.temperature, self.max_tokens, self.timeout_s = temperature, max_tokens, timeout_s
        self.max_retries, self.backoff_s, self.cache_path = max_retries, backoff_s, cache
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.concurrency = max(1, concurrency)
        self._lock = threading.Lock()
        self._identity = hashlib.sha256(json.dumps([model, system_prompt, template]).encode()).hexdigest()[:16]
        self._cache = self._read_cache()

    # --- one judgment -----------------------------------------------------------------------------------------
    def key(self, prompt: str, a: str, b: str, order: str) -> str:
        """Cache key of judging policy response ``a`` against baseline ``b`` in ``order``."""
        return hashlib.sha256(json.dumps([self._identity, prompt, a, b, order]).encode()).hexdigest()

    def parse(self, reply: str) -> str:
        """The verdict (``A``, ``B`` or ``tie``) whose marker occurs last in ``reply``."""
        found = {label: reply.rfind(marker) for label, marker in self.verdicts.items()}
        label, at = max(found.items(), key=lambda kv: kv[1])
        if at < 0:
            raise JudgeError(f"reply has none of {list(self.verdicts.values())}: {reply[:200]!r}")
        return label

    def ask(self, prompt: str, response_a: str, response_b: str) -> tuple[str, str]:
        """Send one request (with retries); return ``(verdict, reply)``."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        content = self.template.format(prompt=prompt, response_a=response_a, response_b=response_b)
        body = json.dumps({"model": self.model, "messages": messages + [{"role": "user", "content": content}],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    reply = json.loads(response.read())["choices"][0]["message"]["content"]
                return self.parse(reply), reply
            except urllib.error.HTTPError as e:
                last = e
                if e.code not in (408, 429) and e.code < 500:  # a client error does not heal by retrying
                    raise JudgeError(f"{self.url} answered HTTP {e.code}: {e.read()[:200]!r}") from e
            except urllib.error.URLError as e:
                if not isinstance(e.reason, TimeoutError):  # refused, unknown host: nobody is listening
                    last = JudgeUnreachableError(
                        f"LLM judge endpoint {self.url} is unreachable ({e.reason}). Start the server, fix "
                        "judge.base_url, or set judge: null to skip LLM judging; finished judgments are kept in "
                        f"{self.cache_path or '(no cache set)'} and a rerun skips them.")
                else:
                    last = e
            except (TimeoutError, ConnectionError, OSError, ValueError, KeyError, IndexError, TypeError,
                    JudgeError) as e:
                last = e  # read timeout, dropped connection, malformed JSON or reply without a verdict
            log.info("judge request failed (attempt %d of %d): %s", attempt + 1, self.max_retries + 1, last)
        if isinstance(last, JudgeUnreachableError):
            raise last
        raise JudgeError(f"{self.url}: no verdict after {self.max_retries + 1} attempts "
                         f"(last: {type(last).__name__}: {last})") from last

    def judge(self, prompt: str, a: str, b: str, order: str) -> tuple[int, bool]:
        """Policy response ``a`` against baseline ``b`` shown in ``order``: (+1/0/-1 from the policy's side,
        whether it came from the cache)."""
        key = self.key(prompt, a, b, order)
        if key in self._cache:
            return self._cache[key], True
        first, second = (a, b) if order == "ab" else (b, a)
        verdict, reply = self.ask(prompt, first, second)
        policy_label = "A" if order == "ab" else "B"
        outcome = 0 if verdict == "tie" else (1 if verdict == policy_label else -1)
        self._append({"key": key, "order": order, "verdict": verdict, "outcome": outcome, "model": self.model,
                      "prompt": prompt, "a": a, "b": b, "reply": reply})
        return outcome, False

    # --- many judgments ---------------------------------------------------------------------------------------
    def compare(self, prompts: Sequence[str], responses: Sequence[str], baseline_responses: Sequence[str],
                progress: bool = False, description: str = "judging") -> JudgeComparison:
        """Judge ``responses`` against ``baseline_responses`` prompt by prompt, in both orders."""
        if not len(prompts) == len(responses) == len(baseline_responses):
            raise ValueError(f"compare: {len(prompts)} prompts, {len(responses)} responses and "
                             f"{len(baseline_responses)} baseline responses; they must align.")
        from tqdm.auto import tqdm

        per_order: dict[tuple[int, str], int | None] = {}
        failures: list[dict[str, object]] = []
        cached = 0
        jobs = [(i, order) for i in range(len(prompts)) for order in ORDERS]
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(jobs), desc=description,
                                                                 disable=not progress) as bar:
            futures = {pool.submit(self.judge, prompts[i], responses[i], baseline_responses[i], order): (i, order)
                       for i, order in jobs}
            try:
                for future in as_completed(futures):
                    i, order = futures[future]
                    try:
                        per_order[i, order], hit = future.result()
                        cached += hit
                    except JudgeUnreachableError:
                        raise
                    except JudgeError as e:
                        per_order[i, order] = None
                        failures.append({"index": i, "order": order, "error": str(e)})
                    bar.update(1)
            except JudgeUnreachableError:
                for f in futures:
                    f.cancel()
                raise
        outcomes = [both_orders_outcome(per_order[i, "ab"], per_order[i, "ba"]) for i in range(len(prompts))]
        result, failed = count_outcomes(outcomes)
        if failures:
            log.warning("judge: %d of %d judgments failed (%d prompts without a verdict); rerun to retry them",
                        len(failures), len(jobs), failed)
        return JudgeComparison(outcomes, result, failed, sorted(failures, key=lambda f: (f["index"], f["order"])),
                               cached)

    # --- cache ------------------------------------------------------------------------------------------------
    def _read_cache(self) -> dict[str, int]:
        cache: dict[str, int] = {}
        if not self.cache_path or not os.path.exists(self.cache_path):
            return cache
        with open(self.cache_path, "rb+") as f:  # end a cut-off last line, so the next append starts a new one
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")
        with open(self.cache_path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                try:
                    row = json.loads(line)
                    cache[row["key"]] = int(row["outcome"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    # an interrupted write leaves a partial last line: skip it (that judgment is asked again)
                    log.warning("%s, line %d: unreadable judgment skipped; it will be asked again",
                                self.cache_path, i + 1)
        log.info("judge cache %s: %d finished judgments", self.cache_path, len(cache))
        return cache

    def _append(self, row: dict[str, object]) -> None:
        with self._lock:
            self._cache[str(row["key"])] = int(row["outcome"])
            if self.cache_path:
                os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
