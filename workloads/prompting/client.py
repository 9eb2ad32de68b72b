"""An async client for any OpenAI-compatible endpoint, built for running many prompts at once.

Around `openai.AsyncOpenAI` (whose own retries are off, so every retry is ours and counted): a concurrency
limit that halves on 429/503 and grows back by one after a run of successes (promptfoo's adaptive scheduler),
retries with exponential backoff, jitter and Retry-After, an on-disk response cache (sqlite, keyed by a hash of
the whole request and of the deployment answering it, as `/v1/models` describes it; on for temperature-0 requests
unless turned off) and totals of tokens, requests and latency.
A request is the keyword arguments of `chat.completions.create` (it has `messages`) or `completions.create`
(it has `prompt`); `model` defaults to the client's. `run_batch` sends completion requests that differ only in
their prompt `batch_prompts` to one HTTP request (the API's prompt array, as lm-evaluation-harness batches), which
spares the endpoint its per-request cost; each prompt is still cached and answered as a request of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import functools
import hashlib
import json
import os
import random
import sqlite3
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_SHED_STATUS = {429, 503}  # the server says "too many": lower the concurrency limit
# What a `/v1/models` card says about the deployment behind a name (OpenAI: created; vLLM: root, parent; Ray Serve LLM:
# metadata). A `created` this recent is the server stamping its answer (vLLM does), not the model's creation.
_IDENTITY_FIELDS = ("id", "created", "root", "parent", "owned_by", "metadata")
_STAMP_WINDOW_S = 60


@dataclass
class Result:
    """One answered request: the text of each choice, its usage and how it was obtained."""

    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # from the first try to the answer, backoff included; 0 for a cache hit
    retries: int = 0
    cached: bool = False
    response: dict[str, Any] = field(default_factory=dict)  # the full response body (model_dump)
    error: str | None = None  # set (and texts empty) when the request failed for good

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    @property
    def message(self) -> dict[str, Any]:
        """The first choice's chat message as a dict (with `tool_calls` when the model called tools)."""
        choices = self.response.get("choices") or [{}]
        return choices[0].get("message") or {"role": "assistant", "content": self.text}


@dataclass
class Stats:
    """Totals over the client's life; tokens count only what the server generated (not cache hits)."""

    requests: int = 0  # requests asked of the client, cache hits included
    http_requests: int = 0  # tries sent to the server
    retries: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0  # summed over answered, uncached requests
    limit_history: list[int] = field(default_factory=list)  # the concurrency limit after each change

    @property
    def mean_latency_s(self) -> float:
        answered = self.requests - self.cache_hits - self.failures
        return self.latency_s / answered if answered > 0 else 0.0


class RequestFailed(Exception):
    """A request that could not be answered (a non-retryable error, or retries exhausted)."""


class AdaptiveLimiter:
    """A concurrency limit that halves when the server sheds load and grows by one after `grow_after` successes."""

    def __init__(self, max_limit: int, grow_after: int = 5, history: list[int] | None = None) -> None:
        if max_limit < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_limit, self.limit, self.grow_after = max_limit, max_limit, grow_after
        self.active = 0
        self._streak = 0
        self._history = history if history is not None else []
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def acquire(self) -> None:
        """Wait for a free slot under the current limit."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (e.g. a second run_all): nothing of the old one is in flight
            self._loop, self.active, self._waiters = loop, 0, deque()
        while self.active >= self.limit:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: pass the free slot on
                raise
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def on_shed(self) -> None:
        """429/503: halve the limit (not below 1)."""
        self._streak = 0
        new = max(1, self.limit // 2)
        if new != self.limit:
            self.limit = new
            self._history.append(new)

    def on_success(self) -> None:
        """A run of `grow_after` successes raises the limit by one (not above the maximum)."""
        self._streak += 1
        if self._streak >= self.grow_after and self.limit < self.max_limit:
            self._streak = 0
            self.limit += 1
            self._history.append(self.limit)
            self._wake()

    def _wake(self) -> None:
        free = self.limit - self.active
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class _Cache:
    """Responses by request hash in one sqlite file; a lock makes it safe across threads of one process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT NOT NULL)")

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, body: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(body)))

    def close(self) -> None:
        with self._lock:
            self._db.close()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process, as httpx builds it by default (certifi, or SSL_CERT_FILE / SSL_CERT_DIR).

    httpx builds a new one for every client, loading the CA bundle (~60 ms of CPU); `run_all` opens a client per
    event loop, i.e. per chunk of a search trial, so that cost was paid on every chunk."""
    return httpx.create_ssl_context()


def default_cache_dir() -> Path:
    """$LLMC_CACHE/prompting, or ~/.cache/llmcluster/prompting."""
    root = Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmcluster")).expanduser()
    return root / "prompting"


def request_key(request: dict[str, Any], namespace: str = "") -> str:
    """The cache key: a hash of the whole request (model, messages or prompt, sampling parameters, n)."""
    canonical = json.dumps({"namespace": namespace, **request}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class AsyncLLMClient:
    """Bounded, adaptive, retrying, caching access to one OpenAI-compatible endpoint."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key_env: str | None = None,
                 api_key: str | None = None, max_concurrency: int = 8, grow_after: int = 5, max_retries: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, timeout_s: float = 120.0,
                 cache: bool | None = None, cache_dir: str | Path | None = None, cache_namespace: str = "",
                 batch_prompts: int = 1) -> None:
        """`api_key_env` names the environment variable holding the key, or `api_key` is the key (neither: a
        placeholder, for local servers); `cache` None caches temperature-0 requests only, True every one, False none;
        `batch_prompts`: completion prompts `run_batch` may send in one request (1: one each)."""
        if batch_prompts < 1:
            raise ValueError("batch_prompts must be at least 1")
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"the API key variable {api_key_env} is not set")
        api_key = api_key or "EMPTY"
        self.base_url, self.model, self._api_key, self.timeout_s = base_url, model, api_key, timeout_s
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.cache_mode, self.cache_namespace, self.batch_prompts = cache, cache_namespace, batch_prompts
        self.stats = Stats()
        self.limiter = AdaptiveLimiter(max_concurrency, grow_after, self.stats.limit_history)
        cache_file = Path(cache_dir or default_cache_dir()) / "responses.sqlite"
        self._cache = _Cache(cache_file) if cache is not False else None
        self._openai: openai.AsyncOpenAI | None = None
        self._openai_loop: asyncio.AbstractEventLoop | None = None
        self._deployments: dict[str, str] | None = None  # model name -> its deployment's identity (`_identities`)
        self._reading_deployments: asyncio.Future[dict[str, str]] | None = None  # one read for concurrent requests

    def _client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        if self._openai is None or self._openai_loop is not loop:  # httpx connections belong to one loop
            self._openai = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout_s,
                                              max_retries=0,
                                              http_client=openai.DefaultAsyncHttpxClient(verify=_tls_context()))
            self._openai_loop = loop
        return self._openai

    def _caches(self, request: dict[str, Any]) -> bool:
        if self._cache is None:
            return False
        return self.cache_mode is True or request.get("temperature") == 0

    async def request(self, request: dict[str, Any]) -> Result:
        """Answer one request (chat if it has `messages`, completion if it has `prompt`); raises RequestFailed."""
        [answer] = await self.request_many([request])
        if isinstance(answer, RequestFailed):
            raise answer
        return answer

    async def request_many(self, requests: Sequence[dict[str, Any]]) -> list[Result | RequestFailed]:
        """One request, or completion requests alike but for their (single) prompts in one HTTP request; answered in
        order, a failed one as its RequestFailed. Cache hits are not sent; when the endpoint refuses the prompt array
        (a 4xx other than 429), each prompt is sent alone, and if every one of them is answered the client stops
        batching (the endpoint does not take arrays)."""
        requests = [self._complete_request(r) for r in requests]
        self.stats.requests += len(requests)
        if self._deployments is None and any(self._caches(r) for r in requests):
            pending = self._reading_deployments
            if pending is None or pending.get_loop() is not asyncio.get_running_loop():
                pending = self._reading_deployments = asyncio.ensure_future(self._identities())
            self._deployments = await asyncio.shield(pending)
        keys = [self._key(r) for r in requests]
        answers: list[Result | RequestFailed | None] = [None] * len(requests)
        for i, key in enumerate(keys):
            if key is not None and (body := self._cache.get(key)) is not None:
                self.stats.cache_hits += 1
                answers[i] = _result(body, latency_s=0.0, retries=0, cached=True)
        todo = [i for i, answer in enumerate(answers) if answer is None]
        if len(todo) > 1:
            batched = {**requests[todo[0]], "prompt": [requests[i]["prompt"] for i in todo]}
            try:
                body, latency_s, retries = await self._send_with_retries(batched)
                bodies = _split_batch(body, len(todo), requests[todo[0]].get("n") or 1)
            except (RequestFailed, ValueError) as exc:
                if isinstance(exc, RequestFailed) and not _refused_request(exc):
                    self.stats.failures += len(todo)
                    return [exc if a is None else a for a in answers]
                bodies = None
            if bodies is not None:
                for i, part in zip(todo, bodies, strict=True):
                    answers[i] = self._answered(part, keys[i], latency_s, retries)
                return answers  # type: ignore[return-value]
        for i in todo:  # one prompt left, or the array refused: one request each
            try:
                body, latency_s, retries = await self._send_with_retries(requests[i])
                answers[i] = self._answered(body, keys[i], latency_s, retries)
            except RequestFailed as exc:
                self.stats.failures += 1
                answers[i] = exc
        if len(todo) > 1 and not any(isinstance(a, RequestFailed) for a in answers):
            self.batch_prompts = 1
        return answers  # type: ignore[return-value]

    def _key(self, request: dict[str, Any]) -> str | None:
        """The cache key, within the deployment now serving the request's model; None (not cached) if not cached or
        the endpoint does not describe that model: an answer from a model redeployed under the same name must not be
        taken for the new one's."""
        identity = (self._deployments or {}).get(request["model"]) if self._caches(request) else None
        return request_key(request, f"{self.cache_namespace}|{identity}") if identity is not None else None

    async def _identities(self) -> dict[str, str]:
        """Each listed model's identity from `/v1/models`, read once per client; an adapter `BASE:NAME` includes its
        base's. Empty when the endpoint does not list its models (then nothing is cached)."""
        asked = time.time()
        try:
            cards = [card.model_dump() async for card in self._client().models.list()]
        except openai.OpenAIError:
            return {}
        own = {card.get("id"): json.dumps({k: card.get(k) for k in _IDENTITY_FIELDS if card.get(k) is not None
                                           and not (k == "created" and card[k] >= asked - _STAMP_WINDOW_S)},
                                          sort_keys=True, default=str) for card in cards}
        return {name: own[name] + own.get(name.split(":")[0], "") if ":" in name else own[name] for name in own}

    def _answered(self, body: dict[str, Any], key: str | None, latency_s: float, retries: int) -> Result:
        """Cache a fresh answer and add it to the totals."""
        if key is not None:
            self._cache.put(key, body)
        result = _result(body, latency_s=latency_s, retries=retries, cached=False)
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.completion_tokens += result.completion_tokens
        self.stats.latency_s += result.latency_s
        return result

    async def _send_with_retries(self, request: dict[str, Any]) -> tuple[dict[str, Any], float, int]:
        """The response body, the seconds from the first try to it, and the retries it took; raises RequestFailed."""
        start, retries = time.monotonic(), 0
        while True:
            await self.limiter.acquire()
            try:
                self.stats.http_requests += 1
                body = await self._send(request)
            except openai.OpenAIError as exc:  # anything else is a bug in the request: it propagates
                delay = self._retry_delay(exc, retries)
                if delay is None:
                    raise RequestFailed(f"{type(exc).__name__}: {exc}") from exc
                if _status(exc) in _SHED_STATUS:
                    self.limiter.on_shed()
                retries += 1
                self.stats.retries += 1
            else:
                self.limiter.on_success()
                return body, time.monotonic() - start, retries
            finally:
                self.limiter.release()
            await asyncio.sleep(delay)  # outside the slot: waiting out a backoff holds no concurrency

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> Result:
        """A chat completion: `params` are the other `chat.completions.create` arguments."""
        return await self.request({"messages": messages, **params})

    async def complete(self, prompt: str, **params: Any) -> Result:
        """A text completion: `params` are the other `completions.create` arguments."""
        return await self.request({"prompt": prompt, **params})

    async def run_batch(self, requests: Sequence[dict[str, Any]]) -> list[Result]:
        """Every request, concurrently within the limit, in order; a failed one carries `error` instead of raising.
        Completion requests alike but for their prompts go `batch_prompts` to an HTTP request (`request_many`)."""
        groups = _batches(requests, self.batch_prompts)
        answered = await asyncio.gather(*(self.request_many([requests[i] for i in group]) for group in groups))
        results: list[Result | None] = [None] * len(requests)
        for group, answers in zip(groups, answered, strict=True):
            for i, answer in zip(group, answers, strict=True):
                failed = isinstance(answer, RequestFailed)
                results[i] = Result([], [], 0, 0, 0.0, error=str(answer)) if failed else answer
        return results  # type: ignore[return-value]

    def run_all(self, requests: Sequence[dict[str, Any]]) -> list[Result]:
        """Sync convenience: `run_batch` on a fresh event loop (in a thread when one is already running here)."""
        async def main() -> list[Result]:
            try:
                return await self.run_batch(requests)
            finally:
                await self.aclose_connections()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(main())
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, main()).result()

    async def aclose_connections(self) -> None:
        """Close the HTTP connections of this event loop's openai client (call it before your own loop ends)."""
        if self._openai is not None and self._openai_loop is asyncio.get_running_loop():
            await self._openai.close()
        self._openai = self._openai_loop = None  # one from an ended loop cannot be closed any more: drop it

    def close(self) -> None:
        """Close the cache file (connections close with their event loop)."""
        if self._cache is not None:
            self._cache.close()

    def _complete_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if ("messages" in request) == ("prompt" in request):
            raise ValueError("a request needs exactly one of 'messages' (chat) or 'prompt' (completion)")
        if "model" not in request:
            if self.model is None:
                raise ValueError("the request names no model and the client has no default model")
            request = {**request, "model": self.model}
        return request

    async def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        client = self._client()
        if "messages" in request:
            response = await client.chat.completions.create(**request)
        else:
            response = await client.completions.create(**request)
        return response.model_dump()

    def _retry_delay(self, exc: Exception, retries: int) -> float | None:
        """Seconds to wait before the next try, or None when `exc` is final (not retryable, or out of tries)."""
        status = _status(exc)
        retryable = isinstance(exc, openai.APIConnectionError) or status in _RETRY_STATUS  # timeouts included
        if not retryable or retries >= self.max_retries:
            return None
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** retries)
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # exponential, with jitter
        after = _retry_after(exc)
        return min(self.max_backoff_s, max(delay, after)) if after is not None else delay


def _batches(requests: Sequence[dict[str, Any]], size: int) -> list[list[int]]:
    """Indices of `requests` in the groups `run_batch` sends: completion requests with one prompt (a string) and
    no streaming, alike in every other field, `size` at a time; every other request alone."""
    groups: list[list[int]] = []
    open_groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        if size < 2 or not isinstance(request.get("prompt"), str) or request.get("stream"):
            groups.append([i])
            continue
        rest = json.dumps({k: v for k, v in request.items() if k != "prompt"}, sort_keys=True, default=str)
        group = open_groups.get(rest)
        if group is None or len(group) >= size:
            group = open_groups[rest] = []
            groups.append(group)
        group.append(i)
    return groups


def _split_batch(body: dict[str, Any], prompts: int, n: int) -> list[dict[str, Any]]:
    """One response body per prompt of a batched completion: prompt i's choices are indices i*n .. i*n+n-1 (the
    API's order), renumbered from 0; the usage, reported for the whole batch, is shared out evenly so totals stay
    exact. ValueError when the choices do not cover every prompt n times."""
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index") or 0)
    if [c.get("index") for c in choices] != list(range(prompts * n)):
        raise ValueError(f"a batched completion of {prompts} prompts x n={n} came back with {len(choices)} choices")
    usage = body.get("usage") or {}
    parts = []
    for i in range(prompts):
        share = {k: usage[k] // prompts + (i < usage[k] % prompts) for k in ("prompt_tokens", "completion_tokens")
                 if isinstance(usage.get(k), int)}
        share["total_tokens"] = sum(share.values())
        mine = [{**c, "index": c["index"] - i * n} for c in choices[i * n:(i + 1) * n]]
        parts.append({**body, "choices": mine, "usage": share})
    return parts


def _refused_request(exc: RequestFailed) -> bool:
    """The endpoint refused the request itself (a 4xx other than 429), rather than failing to answer it."""
    status = _status(exc.__cause__) if isinstance(exc.__cause__, Exception) else None
    return status is not None and 400 <= status < 500 and status != 429


def _status(exc: Exception) -> int | None:
    return exc.status_code if isinstance(exc, openai.APIStatusError) else None


def _retry_after(exc: Exception) -> float | None:
    """The server's Retry-After (seconds or an HTTP date) or retry-after-ms, in seconds."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _result(body: dict[str, Any], *, latency_s: float, retries: int, cached: bool) -> Result:
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index") or 0)
    texts = [(c.get("message") or {}).get("content") or "" if "message" in c else c.get("text") or ""
             for c in choices]
    usage = body.get("usage") or {}
    return Result(texts=texts, finish_reasons=[c.get("finish_reason") for c in choices],
                  prompt_tokens=usage.get("prompt_tokens") or 0, completion_tokens=usage.get("completion_tokens") or 0,
                  latency_s=latency_s, retries=retries, cached=cached, response=body)
