"""Prompting building blocks without Ray: the safe calculator, corpus search, the ReAct parser and loop, and the
async client against a real local HTTP server that sheds load with 429/503."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from workloads.bundled.make_arithmetic import REACT_SYSTEM
from workloads.prompting.client import AdaptiveLimiter, AsyncLLMClient, request_key
from workloads.prompting.harness import _run_agents
from workloads.prompting.react import (
    arun_react,
    parse_reply,
    react_completer,
    run_react,
    run_tool_calling,
)
from workloads.prompting.recipe import VariantConfig
from workloads.prompting.tools import (
    CalculatorLimits,
    CorpusSearch,
    ToolError,
    calculate,
    default_registry,
    format_number,
    search_tool,
)
from workloads.serve.objectstore import free_port

BUNDLED = Path(__file__).resolve().parent.parent / "workloads" / "bundled"

# ------------------------------------------------------------------------------------------------ calculator


@pytest.mark.parametrize(("expression", "expected"), [
    ("17 + 72", "89"), ("3 * (4 + 5)", "27"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("-7 % 3", "2"),
    ("2 ** 100", str(2 ** 100)), ("2 ** -2", "0.25"), ("0.1 + 0.2", "0.3"), ("-(+5) - -3", "-2"),
    ("123456789 * 987654321", str(123456789 * 987654321)), ("1 / 3", "0.3333333333333333333333333333"),
])
def test_calculator_exact(expression: str, expected: str) -> None:
    assert format_number(calculate(expression)) == expected


def test_calculator_keeps_fractions_exact() -> None:
    assert calculate("1/3 + 1/3 + 1/3") == Fraction(1)


@pytest.mark.parametrize(("expression", "reason"), [
    ("__import__('os').system('id')", "function calls"),
    ("(1).real", "attribute access"),
    ("x + 1", "names"),
    ("[1, 2][0]", "subscripts"),
    ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"),
    ("1j * 2", "only numbers"),
    ("lambda: 1", "lambdas"),
    ("1 < 2", "comparisons"),
    ("9**9**9", "exponent"),
    ("10 ** 200", "exponent"),
    ("99 ** 99", "digits"),
    ("-" * 80 + "1", "nested deeper"),
    ("1 +" * 100 + "1", "longer than"),
    ("1 / 0", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "cannot parse"),
    ("", "empty"),
])
def test_calculator_refuses(expression: str, reason: str) -> None:
    with pytest.raises(ToolError, match=reason):
        calculate(expression)


def test_calculator_bounds_are_configurable_and_errors_never_escape() -> None:
    with pytest.raises(ToolError, match="nested deeper than 3"):
        calculate("1 + 2 + 3 + 4", CalculatorLimits(max_depth=3))
    registry = default_registry()
    result = registry.call("calculator", {"expression": "__import__('os').system('id')"})
    assert not result.ok and "function calls are not allowed" in result.output
    assert registry.call("calculator", {"expression": "9**9**9"}).ok is False
    assert registry.call("calculator", {"expression": "49 + 97"}).output == "146"


# ---------------------------------------------------------------------------------------------------- search

CORPUS = [
    {"title": "Ray Tune", "text": "Ray Tune runs hyperparameter search with schedulers such as ASHA."},
    {"title": "vLLM", "text": "vLLM serves language models with paged attention and continuous batching."},
    {"title": "Paris", "text": "Paris is the capital of France, on the river Seine."},
    {"title": "LoRA", "text": "LoRA fine-tunes a model through low-rank adapters on attention weights."},
]


def test_search_ranks_the_relevant_document_first(tmp_path: Path) -> None:
    index = CorpusSearch(CORPUS)
    assert index.search("what is the capital of France")[0][0] == 2
    assert index.search("low-rank adapters")[0][0] == 3
    assert index.search("zebra") == []
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(d["text"] for d in CORPUS))
    for path in (jsonl, text):
        tool = search_tool(path)
        assert tool.func(query="ASHA scheduler").startswith("[1] ")
        assert "ASHA" in tool.func(query="ASHA scheduler").splitlines()[0]
    registry = default_registry(CORPUS)
    assert registry.call("search", {"query": "paged attention serving"}).output.startswith("[1] vLLM:")
    assert not registry.call("search", {"query": ""}).ok


# ------------------------------------------------------------------------------------------------- ReAct parse

GOOD = ('Thought: I should add the numbers with the calculator.\n'
        'Action: calculator\nAction Input: {"expression": "17 + 72"}')


def test_parser_reads_actions_and_final_answers() -> None:
    registry = default_registry()
    parsed = parse_reply(GOOD, registry)
    assert (parsed.action, parsed.args, parsed.error) == ("calculator", {"expression": "17 + 72"}, None)
    assert parsed.thought == "I should add the numbers with the calculator."
    hallucinated = parse_reply(GOOD + "\nObservation: 12\nFinal Answer: 12", registry)
    assert hallucinated.text == GOOD and hallucinated.final_answer is None and hallucinated.args is not None
    fenced = parse_reply('Action: calculator\nAction Input: ```json\n{"expression": "1+1"}\n```', registry)
    assert fenced.args == {"expression": "1+1"}
    final = parse_reply("Thought: I know the answer\nFinal Answer: The sum of 17 and 72 is 89.", registry)
    assert final.final_answer == "The sum of 17 and 72 is 89." and final.error is None


@pytest.mark.parametrize(("reply", "problem"), [
    ("Thought: I am not sure.", "neither an Action nor a Final Answer"),
    ('Action: calc\nAction Input: {"expression": "1"}', "unknown tool 'calc'"),
    ("Action: calculator", "Action Input line"),
    ("Action: calculator\nAction Input: {expression: 17 + 72}", "not valid JSON"),
    ('Action: calculator\nAction Input: ["17 + 72"]', "must be a JSON object"),
    ('Action: calculator\nAction Input: {"expr": "17 + 72"}', "invalid arguments for calculator"),
    ('Action: calculator\nAction Input: {"expression": 17}', "is not of type 'string'"),
    ("Action:\nAction Input: {}", "names no tool"),
    ("Final Answer:", "Final Answer is empty"),
    ("", "neither an Action nor a Final Answer"),
])
def test_parser_turns_malformed_actions_into_observations(reply: str, problem: str) -> None:
    parsed = parse_reply(reply, default_registry())
    assert parsed.error is not None and problem in parsed.error
    assert "Action: one of calculator" in parsed.error and "Action Input:" in parsed.error  # the expected format
    assert parsed.args is None and parsed.final_answer is None


# -------------------------------------------------------------------------------------------------- ReAct loop

def _scripted(turns: list[str]):
    seen: list[list[dict]] = []

    def complete(messages: list[dict]) -> str:
        seen.append(messages)
        return turns[len(seen) - 1]

    return complete, seen


def test_agent_reproduces_a_bundled_trace() -> None:
    row = json.loads((BUNDLED / "arithmetic_react_test.jsonl").read_text().splitlines()[0])
    expected = row["messages"]
    question = expected[1]["content"]
    turns = [m["content"] for m in expected if m["role"] == "assistant"]
    complete, _ = _scripted(turns)
    result = run_react(question, complete, default_registry(), system_prompt=REACT_SYSTEM)
    assert result.messages == expected  # same layout as the traces the tiny model is trained on
    assert result.stop_reason == "final_answer" and result.final_answer == turns[-1].split("Final Answer: ")[1]
    assert result.tool_calls == 1 and result.format_errors == 0


def test_agent_recovers_from_a_malformed_action() -> None:
    turns = ["Thought: add\nAction: calculator\nAction Input: 17 + 72", GOOD,
             "Thought: I know the answer\nFinal Answer: 17 + 72 = 89"]
    complete, seen = _scripted(turns)
    result = run_react("What is 17 + 72?", complete, default_registry(), max_steps=4)
    assert result.final_answer == "17 + 72 = 89" and result.format_errors == 1 and result.tool_calls == 1
    assert seen[1][-1]["role"] == "user" and seen[1][-1]["content"].startswith("Observation: Invalid reply:")
    assert result.messages[-2] == {"role": "user", "content": "Observation: 89"}


def test_agent_stops_at_max_steps_and_on_model_errors() -> None:
    result = run_react("What is 1 + 1?", lambda messages: "Thought: hmm", default_registry(), max_steps=3)
    assert result.stop_reason == "max_steps" and result.final_answer is None and result.format_errors == 3
    refused = run_react("?", _scripted(['Action: calculator\nAction Input: {"expression": "x"}'] * 2)[0],
                        default_registry(), max_steps=2)
    assert refused.messages[3]["content"] == "Observation: Error: names are not allowed"

    def broken(messages: list[dict]) -> str:
        raise ConnectionError("endpoint down")

    failed = run_react("What is 1 + 1?", broken, default_registry())
    assert failed.stop_reason == "model_error" and "endpoint down" in failed.error


def test_native_tool_calling_loop() -> None:
    registry = default_registry()
    assert registry.openai_tools()[0]["function"]["name"] == "calculator"
    replies = [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function",
             "function": {"name": "calculator", "arguments": json.dumps({"expression": "2*21"})}},
            {"id": "b", "type": "function", "function": {"name": "calculator", "arguments": "{bad json"}},
            {"id": "c", "type": "function", "function": {"name": "nope", "arguments": "{}"}}]},
        {"role": "assistant", "content": "42"},
    ]
    seen_tools = []

    def create(messages: list[dict], tools: list[dict]) -> dict:
        seen_tools.append(tools)
        return replies[len(seen_tools) - 1]

    result = run_tool_calling("What is 2*21?", create, registry)
    assert result.final_answer == "42" and result.stop_reason == "final_answer"
    tool_messages = [m for m in result.messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["a", "b", "c"]
    assert tool_messages[0]["content"] == "42"
    assert "not valid JSON" in tool_messages[1]["content"] and "unknown tool" in tool_messages[2]["content"]
    assert seen_tools[0] == registry.openai_tools()


# ------------------------------------------------------------------------------------------ client over HTTP

_MODELS = [{"id": "tiny", "object": "model", "created": 1_700_000_000, "owned_by": "llmc", "root": "/models/tiny-v1"},
           {"id": "tiny:arith", "object": "model", "created": 1_700_000_000, "owned_by": "llmc"}]


class _Server:
    """An OpenAI-shaped endpoint on 127.0.0.1 that answers the statuses in `script` first, then 200."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.received = 0
        self.in_flight = self.max_in_flight = 0
        self.retry_after = "0"
        self.arrays = True
        self.models: list[dict] | None = list(_MODELS)  # the `/v1/models` cards; None: the route answers 404
        self.models_read = 0
        self.sent_usage: dict[str, list[tuple[int, int]]] | None = None  # question -> usage sent, when recorded
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                Route("/v1/completions", self.completions, methods=["POST"]),
                                Route("/v1/models", self.list_models, methods=["GET"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset(self, script: list[int] = (), arrays: bool = True, sent_usage: bool = False) -> None:
        """`sent_usage`: each chat answer's usage is its messages' and reply's lengths, recorded by question."""
        self.script, self.received, self.max_in_flight, self.arrays = list(script), 0, 0, arrays
        self.models, self.models_read = list(_MODELS), 0
        self.sent_usage = {} if sent_usage else None

    async def list_models(self, request: Request) -> JSONResponse:
        self.models_read += 1
        if self.models is None:
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        return JSONResponse({"object": "list", "data": self.models})

    async def _answer(self, body: dict, choices: list[dict]) -> JSONResponse:
        self.received += 1
        if self.script:  # shed at once, as a full queue does
            status = self.script.pop(0)
            headers = {"retry-after": self.retry_after} if status == 429 else {}
            return JSONResponse({"error": {"message": f"status {status}"}}, status_code=status, headers=headers)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            usage = (5, 3)
            if self.sent_usage is not None and "messages" in body:
                usage = (sum(len(m["content"] or "") for m in body["messages"]),
                         sum(len(c["message"]["content"]) for c in choices))
                question = next(m["content"] for m in body["messages"] if m["role"] == "user")
                self.sent_usage.setdefault(question, []).append(usage)
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": choices, "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                                               "total_tokens": sum(usage)}})
        finally:
            self.in_flight -= 1

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        last = body["messages"][-1]["content"]
        if last == "bad":
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        if body.get("stop") and last.startswith("What"):  # a ReAct turn
            reply = 'Thought: add\nAction: calculator\nAction Input: {"expression": "40 + 2"}'
        elif last.startswith("Observation:"):
            reply = f"Thought: I know the answer\nFinal Answer: {last.split(': ', 1)[1]}"
        else:
            reply = f"echo {last}"
        choices = [{"index": i, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                   for i in range(body.get("n") or 1)]
        return await self._answer(body, choices)

    async def completions(self, request: Request) -> JSONResponse:
        """Echoes each prompt n times, prompt by prompt (the API's order for a prompt array); with `arrays` False it
        refuses an array with 400, as endpoints that take one prompt per request do."""
        body = await request.json()
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if isinstance(body["prompt"], list) and not self.arrays:
            self.received += 1
            return JSONResponse({"error": {"message": "prompt must be a string"}}, status_code=400)
        n = body.get("n") or 1
        choices = [{"index": i * n + j, "text": f"{p} done {j}" if n > 1 else f"{p} done", "finish_reason": "stop"}
                   for i, p in enumerate(prompts) for j in range(n)]
        return await self._answer(body, choices)


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    srv.thread.start()
    deadline = time.monotonic() + 10
    while not srv.server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    yield srv
    srv.server.should_exit = True
    srv.thread.join(timeout=5)


def test_limiter_blocks_above_a_lowered_limit() -> None:
    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def scenario() -> None:
        limiter = AdaptiveLimiter(4, grow_after=1)
        for _ in range(4):
            await limiter.acquire()
        limiter.on_shed()  # 4 -> 2 with 4 in flight
        first = asyncio.ensure_future(limiter.acquire())
        limiter.release()
        limiter.release()
        await settle()
        assert limiter.limit == 2 and limiter.active == 2 and not first.done()  # at the limit: waits
        limiter.on_success()  # 2 -> 3 wakes it
        await settle()
        assert first.done() and limiter.active == 3
        second = asyncio.ensure_future(limiter.acquire())
        await settle()
        second.cancel()
        await settle()
        limiter.release()
        third = asyncio.ensure_future(limiter.acquire())
        await settle()
        assert second.cancelled() and third.done() and limiter.active == 3

    asyncio.run(scenario())


def _client(server: _Server, tmp_path: Path, **kwargs) -> AsyncLLMClient:
    return AsyncLLMClient(server.url, model="tiny", max_concurrency=8, grow_after=2, backoff_s=0.01,
                          cache_dir=tmp_path, **kwargs)


def test_client_retries_shed_load_and_adapts_concurrency(server: _Server, tmp_path: Path) -> None:
    server.reset([429, 429, 503, 429])
    client = _client(server, tmp_path, cache=False)
    requests = [{"messages": [{"role": "user", "content": f"q{i}"}], "temperature": 0} for i in range(30)]
    results = client.run_all(requests)
    assert [r.text for r in results] == [f"echo q{i}" for i in range(30)]  # every request answered, in order
    stats = client.stats
    assert stats.retries == 4 and sum(r.retries for r in results) == 4 and stats.failures == 0
    assert stats.http_requests == server.received == 34
    assert stats.prompt_tokens == 150 and stats.completion_tokens == 90 and stats.cache_hits == 0
    # halved on each 429/503 and never below 1 (the fourth shed leaves it at 1), then +1 per 2 successes up to 8
    assert stats.limit_history == [4, 2, 1, 2, 3, 4, 5, 6, 7, 8] and client.limiter.limit == 8
    assert 1 <= server.max_in_flight <= 8  # bounded
    client.close()


def test_client_respects_retry_after_and_fails_cleanly(server: _Server, tmp_path: Path) -> None:
    server.reset([429])
    server.retry_after = "0.3"
    client = _client(server, tmp_path, cache=False, max_retries=2)
    start = time.monotonic()
    [result] = client.run_all([{"messages": [{"role": "user", "content": "hi"}]}])
    assert result.text == "echo hi" and result.retries == 1 and time.monotonic() - start >= 0.3
    server.retry_after = "0"
    server.reset([503, 503, 503])  # more failures than max_retries
    [gave_up, bad] = client.run_all([{"messages": [{"role": "user", "content": "hi"}]},
                                     {"messages": [{"role": "user", "content": "bad"}]}])
    assert gave_up.error and "503" in gave_up.error and gave_up.texts == []
    assert bad.error and "400" in bad.error  # not retryable: one try
    assert client.stats.failures == 2 and client.stats.retries == 1 + 2
    client.close()


def test_client_cache_serves_repeats_without_the_server(server: _Server, tmp_path: Path) -> None:
    server.reset()
    request = {"messages": [{"role": "user", "content": "cache me"}], "temperature": 0, "n": 2}
    client = _client(server, tmp_path)
    first = client.run_all([request])[0]
    second = client.run_all([request])[0]  # a second run_all: a new event loop, the same client
    assert server.received == 1 and second.cached and not first.cached
    assert second.texts == first.texts == ["echo cache me"] * 2 and client.stats.cache_hits == 1
    assert client.stats.prompt_tokens == 5  # tokens count what the server generated
    sampled = {**request, "temperature": 0.7}
    client.run_all([sampled, sampled])
    assert server.received == 3  # not cached by default when sampling
    client.close()
    reopened = _client(server, tmp_path)  # the cache is on disk
    assert reopened.run_all([request])[0].cached and server.received == 3
    reopened.close()
    off = _client(server, tmp_path, cache=False)
    assert not off.run_all([request])[0].cached and server.received == 4
    assert request_key(request) != request_key({**request, "n": 1}) != request_key({**request, "model": "other"})


def test_client_cache_misses_once_the_model_behind_the_name_is_redeployed(server: _Server, tmp_path: Path) -> None:
    """The cache key holds what `/v1/models` says of the deployment (created, root, parent, ...): a model redeployed
    under the same name, or an adapter whose base was, is asked again; a `created` that only stamps the answer (vLLM)
    does not split the cache; an endpoint that lists no models gets no caching at all."""
    server.reset()
    asks = [{"prompt": "redeploy me", "temperature": 0}, {"prompt": "redeploy me", "temperature": 0,
                                                         "model": "tiny:arith"}]

    def cached_after() -> list[bool]:
        client = _client(server, tmp_path)  # a new run: the same cache file, the deployment read afresh
        try:
            return [r.cached for r in client.run_all(asks)]
        finally:
            client.close()

    assert cached_after() == [False, False] and cached_after() == [True, True] and server.received == 2
    assert server.models_read == 2  # once per client, though its requests run concurrently
    server.models = [{**server.models[0], "root": "/models/tiny-v2"}, server.models[1]]
    assert cached_after() == [False, False] and server.received == 4  # the base redeployed: its adapter too
    server.models = [server.models[0], {**server.models[1], "created": 1_700_000_500}]
    assert cached_after() == [True, False] and server.received == 5  # only the adapter changed
    server.models = [{**card, "created": int(time.time())} for card in server.models]  # vLLM stamps each answer
    assert cached_after() == [False, False] and cached_after() == [True, True]
    server.models = None
    assert cached_after() == [False, False] == cached_after()


def test_client_completions_and_react_through_the_endpoint(server: _Server, tmp_path: Path) -> None:
    server.reset()
    client = _client(server, tmp_path, cache=False)
    [completion] = client.run_all([{"prompt": "say", "max_tokens": 4}])
    assert completion.text == "say done"

    async def agent():
        try:
            return await arun_react("What is 40 + 2?", react_completer(client), default_registry())
        finally:
            await client.aclose_connections()

    result = asyncio.run(agent())
    assert result.final_answer == "42" and result.tool_calls == 1
    with pytest.raises(ValueError, match="exactly one of"):
        client.run_all([{"model": "tiny"}])
    client.close()


def test_concurrent_agent_episodes_count_only_their_own_tokens(server: _Server, tmp_path: Path) -> None:
    """Episodes run side by side on one client; each reports the usage of its own responses (the server's usage
    differs per response), and together they make the client's totals."""
    server.reset(sent_usage=True)
    client = _client(server, tmp_path, cache=False)
    questions = [f"What is 40 + 2?{' Please.' * i}" for i in range(6)]
    requests = [{"model": "tiny", "temperature": 0.0, "max_tokens": 32,
                 "messages": [{"role": "system", "content": REACT_SYSTEM}, {"role": "user", "content": q}]}
                for q in questions]
    variant = VariantConfig(name="agent", prompt="arithmetic-react", agent="react", max_steps=3)
    results = _run_agents(client, variant, requests, {})
    assert [r.text for r in results] == ["42"] * 6 and server.max_in_flight > 1  # they did overlap
    for question, result in zip(questions, results, strict=True):
        sent = server.sent_usage[question]
        assert len(sent) == 2  # the action, then the final answer
        assert (result.prompt_tokens, result.completion_tokens) == tuple(map(sum, zip(*sent, strict=True)))
    assert len({r.prompt_tokens for r in results}) == 6  # each its own, not one shared difference
    assert sum(r.prompt_tokens for r in results) == client.stats.prompt_tokens
    assert sum(r.completion_tokens for r in results) == client.stats.completion_tokens
    client.close()


def test_client_batches_alike_completions_and_retries_a_shed_batch_whole(server: _Server, tmp_path: Path) -> None:
    server.reset([503])
    client = _client(server, tmp_path, cache=False, batch_prompts=4)
    requests = [{"prompt": f"p{i}", "max_tokens": 4, "n": 2} for i in range(10)]
    requests += [{"prompt": "other", "max_tokens": 8}, {"messages": [{"role": "user", "content": "chat"}]}]
    results = client.run_all(requests)
    assert [r.texts for r in results[:10]] == [[f"p{i} done 0", f"p{i} done 1"] for i in range(10)]
    assert results[10].text == "other done" and results[11].text == "echo chat"  # other parameters, chat: alone
    # 10 alike prompts in batches of 4, 4 and 2, one retried after the 503; the odd completion; the chat request
    assert server.received == 6 and client.stats.retries == 1 and client.stats.requests == 12
    # the fake reports 5 prompt tokens per response: a batch's usage is shared out among its prompts, exactly
    assert client.stats.prompt_tokens == 5 * 5 and [r.prompt_tokens for r in results[:4]] == [2, 1, 1, 1]


def test_client_sends_prompts_alone_to_an_endpoint_that_refuses_arrays(server: _Server, tmp_path: Path) -> None:
    server.reset(arrays=False)
    client = _client(server, tmp_path, cache=False, batch_prompts=4)
    requests = [{"prompt": f"p{i}", "max_tokens": 4} for i in range(8)]
    assert [r.text for r in client.run_all(requests)] == [f"p{i} done" for i in range(8)]
    # both batches refused (400), then each prompt alone; the client stops batching
    assert client.batch_prompts == 1 and server.received == 2 + 8 and client.stats.failures == 0
    client.run_all(requests)
    assert server.received == 18
