"""Serving end to end: `llmc serve` on the session's Ray cluster, answered through the real `openai` client.

One server for the session (tests/conftest.py `server`; a vLLM engine takes about a minute to start on 2 cores): the
tiny model plus the session's trained LoRA adapters, two API keys from the environment, the adapter store a local S3
endpoint started by the driver. Tests that need no server come first.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import ALLOWED_ORIGIN, REPO, Server, run_llmc
from workloads.common.recipe import RecipeError
from workloads.common.reporting import percentile
from workloads.kinds import load_recipe
from workloads.scoring.answers import final_number
from workloads.serve.plan import serve_plan

RECIPE = REPO / "workloads/configs/serve-tiny.yaml"
GPU_RECIPE = REPO / "workloads/configs/llama3-8b-serve.yaml"
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
PROMPT = "12+7="


def random_adapter(model_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A PEFT LoRA adapter for the tiny model with random (non-zero) weights: it changes greedy output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------------------------------------
# Without a server: recipe rules, the plan, the GPU recipe
# ---------------------------------------------------------------------------------------------


def test_non_loopback_host_without_a_key_is_refused_before_any_work():
    env = {"LLMC_API_KEYS": ""}
    result = run_llmc("serve", str(RECIPE), "--set", "server.host=0.0.0.0", env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "field 'server.host'" in result.stderr and "refusing to bind '0.0.0.0'" in result.stderr
    assert "Ray" not in result.stdout  # refused before connecting
    static = run_llmc("validate", str(RECIPE), "--set", "server.host=0.0.0.0", "--set", "server.api_key_env=null",
                      timeout=120)
    assert static.returncode == 2 and "server.host" in static.stderr, static.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("autoscaling.min_replicas=3", "min_replicas (3) exceeds max_replicas"),
        ("engine.max_model_len=4096", "exceeds the tiny model's max_position_embeddings"),
        ("adapters.store_uri=/tmp/adapters", "object-store URI"),
        ("adapters.paths={'a:b': x}", "adapter names"),
        ("generate.max_tokens=600", "leave room for the prompt"),
        ("server.cache=1", "unknown field"),
    ],
)
def test_bad_serve_recipe_exits_2_with_the_reason(change, message):
    result = run_llmc("validate", str(RECIPE), "--set", change, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_gpu_recipe_plan_matches_ray_serve_llm_placement_and_fits_the_cluster(ray_cluster):
    from ray.serve.llm.deployment import LLMServer

    from cluster.serve import llm_config
    from workloads.serve.deploy import build_spec

    recipe = load_recipe(GPU_RECIPE)
    plan = serve_plan(recipe)
    tp = recipe.engine.tensor_parallel_size
    assert tp == 2 and recipe.resources.use_gpu and recipe.model.dtype == "bfloat16"
    assert plan["engine_workers_per_replica"] == tp
    assert [b["GPU"] for b in plan["placement_bundles_per_replica"]] == [1, 1]
    assert plan["total_resources_at_max_replicas"]["GPU"] == tp * recipe.autoscaling.max_replicas
    assert plan["engine_kwargs"]["tensor_parallel_size"] == tp and plan["engine_kwargs"]["enable_lora"]
    # Ray Serve LLM's own placement for the same recipe: the plan must be what it will ask the cluster for.
    spec = build_spec(recipe, recipe.model.name, recipe.adapters.store_uri, {}, ["key"])
    options = LLMServer.get_deployment_options(llm_config(spec))
    assert options["placement_group_bundles"] == plan["placement_bundles_per_replica"]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["autoscaling_config"]["max_replicas"] == recipe.autoscaling.max_replicas
    assert options["max_queued_requests"] == recipe.autoscaling.max_queued_requests
    # Every replica fits on one GPU node (STRICT_PACK), and max_replicas fit the cluster's GPU nodes.
    gpu_nodes = [t for t in CLUSTER["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    per_node = max(t["resources"]["GPU"] for t in gpu_nodes)
    cpus_per_node = max(t["resources"].get("CPU", 0) for t in gpu_nodes)
    assert per_node >= tp and cpus_per_node >= plan["resources_per_replica"]["CPU"]
    replicas_that_fit = sum(t["max_workers"] * (t["resources"]["GPU"] // tp) for t in gpu_nodes)
    assert replicas_that_fit >= recipe.autoscaling.max_replicas


def test_tiny_and_gpu_serve_recipes_differ_only_where_scale_does():
    tiny, gpu = load_recipe(RECIPE), load_recipe(GPU_RECIPE)
    assert tiny.adapters.enabled and gpu.adapters.enabled
    assert tiny.adapters.store_uri.startswith("s3://") and gpu.adapters.store_uri.startswith("s3://")
    assert tiny.adapters.endpoint_url == "local" and gpu.adapters.endpoint_url is None
    assert tiny.server.api_key_env == gpu.server.api_key_env == "LLMC_API_KEYS"
    assert gpu.autoscaling.max_replicas > gpu.autoscaling.min_replicas  # autoscaled


def test_tool_call_parser_reaches_vllms_frontend_and_an_unknown_one_is_refused_with_the_allowed_names():
    from vllm.tool_parsers import ToolParserManager

    from workloads.common.recipe import RecipeError
    from workloads.serve.deploy import check_before_start, check_tool_call_parser, vllm_tool_parsers
    from workloads.serve.plan import serve_frontend_kwargs

    tiny = load_recipe(RECIPE)
    assert serve_frontend_kwargs(tiny) == {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    assert vllm_tool_parsers() == sorted(ToolParserManager.lazy_parsers)  # read from vLLM's source, not imported
    check_tool_call_parser("hermes")
    assert serve_frontend_kwargs(load_recipe(GPU_RECIPE)) == {}  # Llama 3.0's template has no tool format
    wrong = tiny.model_copy(update={"engine": tiny.engine.model_copy(update={"tool_call_parser": "hermes3"})})
    with pytest.raises(RecipeError, match=r"field 'engine.tool_call_parser': 'hermes3' is not one of .*"
                                          r"allowed: .*\bhermes\b.*llama3_json"):
        check_before_start(wrong, [])


# ---------------------------------------------------------------------------------------------
# One real server for the rest of the module
# ---------------------------------------------------------------------------------------------


def test_cross_origin_access_only_for_the_recipes_origins_preflight_before_the_key(server):
    url = f"{server.base}/v1/chat/completions"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(url, headers={"Origin": ALLOWED_ORIGIN, **preflight})  # no key: browsers send none
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "access-control-allow-credentials" not in allowed.headers
    refused = httpx.options(url, headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    answered = httpx.get(f"{server.base}/v1/models", headers={"Origin": "https://evil.example", **server.headers})
    assert answered.status_code == 200 and "access-control-allow-origin" not in answered.headers


def test_models_lists_the_base_model_and_the_adapter_by_name(server):
    assert {m.id for m in server.client().models.list().data} == {"tiny", "tiny:arith", "tiny:react", "tiny:aligned"}


def test_completion_and_chat_answer_with_usage(server):
    client = server.client()
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    assert done.choices[0].text and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content is not None
    assert chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 10


def test_streaming_matches_the_non_streamed_greedy_answer(server):
    client = server.client()
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks if c.choices) == whole
    messages = [{"role": "user", "content": "Add 3 and 4."}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_n_samples_and_stop_sequences(server):
    client = server.client()
    many = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    cut, stop = _first_seen_after_the_start(text)
    stopped = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[:cut], (text, stop)


def _first_seen_after_the_start(text: str) -> tuple[int, str]:
    """(i, s): the first i > 0 with a piece s of `text` that starts there and nowhere before, so that a greedy answer
    stopped at s is `text[:i]` whatever the model wrote (the tiny model's answer differs between CPUs: "44..." on
    one, where a stop at the second character's first occurrence would cut at the first)."""
    pieces = [(i, text[i:i + n]) for i in range(1, len(text)) for n in range(1, len(text) - i + 1)
              if text.find(text[i:i + n]) == i]
    assert pieces, f"no piece of {text!r} starts after its start only"
    return next((p for p in pieces if p[1][0].isascii() and p[1][0].isalnum()), pieces[0])  # a letter or digit first


def test_adapter_by_name_answers_differently_from_the_base_model(server):
    client = server.client()
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    tuned = client.completions.create(model="tiny:arith", prompt=PROMPT, max_tokens=16, temperature=0)
    assert tuned.model == "tiny:arith" and tuned.choices[0].text != base.choices[0].text
    chat = client.chat.completions.create(model="tiny:arith", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content is not None


def test_the_grpo_aligned_adapter_is_served_and_answers_held_out_sums(server, grpo_run):
    """`llmc align`'s GRPO adapter (the `grpo_run` fixture), served by name beside the others: asked held-out task
    questions as the RL loop asked them (chat, greedy), it answers far more of them with the right final number than
    the served base model does. The margin, not a floor on the toy's own score: how many of 10 a 2-iteration run
    gets follows the CPU's arithmetic (6 of 10 on one Xeon, 5 on CI's machine), while the base model gets almost
    none in this format on any (5 of 200 in the demo)."""
    from workloads.data.formats import prompt_messages

    client = server.client()
    rows = [json.loads(line) for line in (REPO / "workloads/bundled/arithmetic_test.jsonl").read_text().splitlines()]
    right = {"tiny": 0, "tiny:aligned": 0}
    for row in rows[:10]:
        messages, reference = prompt_messages(row, "alpaca")
        for model in right:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
            assert reply.model == model and reply.choices[0].message.content is not None
            right[model] += final_number(reply.choices[0].message.content) == final_number(reference)
    summary = f"{right} of 10 (the run's held-out greedy reward: {grpo_run['summary']['final_mean_reward']})"
    assert right["tiny:aligned"] >= right["tiny"] + 3, summary


def test_tools_come_back_as_tool_calls_and_the_tools_result_is_answered(server):
    """engine.tool_call_parser (hermes): a chat request offering tools is served, not refused with 400; the agent
    adapter, trained on the tool-calling traces, calls the calculator (`tool_calls`, finish_reason tool_calls), and
    the tool's result sent back gets a final answer, not another call. The calls are right (the question's sum);
    whether the tiny model copies the result into its answer depends on the CPU's float arithmetic (on an AMD EPYC
    without AVX-512: "89" back, "The answer is 97."), so the answer is held to its form, a stated number."""
    from workloads.prompting.tools import default_registry

    registry = default_registry()
    tools, client = registry.openai_tools(), server.client()
    base = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                          tools=tools, max_tokens=16, temperature=0)
    assert base.choices[0].finish_reason in ("stop", "length", "tool_calls")
    right_calls = 0
    for question in ("What is 17 + 72?", "What is 32 + 15?", "What is 63 + 97?"):  # held out (arithmetic_test.jsonl)
        messages = [{"role": "system", "content": "Answer the question using the calculator tool."},
                    {"role": "user", "content": question}]
        choice = client.chat.completions.create(model="tiny:react", messages=messages, tools=tools, max_tokens=64,
                                                temperature=0).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        call = choice.message.tool_calls[0]
        arguments = json.loads(call.function.arguments)
        assert call.function.name == "calculator" and set(arguments) == {"expression"}, call
        result = registry.call("calculator", arguments)
        assert result.ok, result
        right_calls += float(result.output) == sum(map(int, re.findall(r"\d+", question)))
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": result.output}]
        final = client.chat.completions.create(model="tiny:react", messages=messages, tools=tools, max_tokens=32,
                                               temperature=0).choices[0]
        assert final.finish_reason == "stop" and not final.message.tool_calls
        assert final_number(final.message.content) is not None, final.message.content
    assert right_calls >= 2  # measured: 19 of 20 held-out questions (tests/test_prompting_eval.py)


def test_requests_without_a_valid_key_get_401_and_health_is_public(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.key}):
        resp = httpx.post(f"{server.base}/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers)
        assert resp.status_code == 401 and "API key" in resp.json()["error"]["message"]
    assert httpx.get(f"{server.base}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="not-the-key").models.list()
    health = httpx.get(f"{server.base}/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"


BAD_REQUESTS = [
    # (what, path, body or raw bytes, status, words the message must hold)
    ("malformed JSON", "completions", b'{"model": "tiny", "prompt": ', 400, "JSON"),
    ("unknown model", "completions", {"model": "nope", "prompt": "x"}, 404, "nope"),
    ("negative max_tokens", "completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", "completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, "context length"),
    ("prompt over the context", "completions", {"model": "tiny", "prompt": "1+1=" * 400, "max_tokens": 4}, 400,
     "maximum context length"),
    ("wrong type", "completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("chat without messages", "chat/completions", {"model": "tiny"}, 400, "messages"),
    ("chat, huge max_tokens", "chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999}, 400, "max_tokens"),
    # Field rules of the OpenAI API (cluster/openai_checks.py has one case per rule).
    ("temperature out of range", "completions", {"model": "tiny", "prompt": "x", "temperature": 3}, 400,
     "temperature"),
    ("top_p of 0", "completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("five stop sequences", "completions", {"model": "tiny", "prompt": "x", "stop": list("abcde")}, 400, "stop"),
    ("unknown role", "chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "role"),
    ("stream_options without stream", "chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400, "stream_options"),
]


def test_bad_requests_get_a_4xx_naming_the_problem_while_a_good_request_succeeds(server):
    client = server.client()
    with ThreadPoolExecutor(max_workers=len(BAD_REQUESTS) + 1) as pool:
        good = pool.submit(client.chat.completions.create, model="tiny", max_tokens=48, temperature=0,
                           messages=[{"role": "user", "content": "Count to ten."}], extra_body={"ignore_eos": True})

        def send(case):
            _, path, body, _, _ = case
            kwargs = {"content": body, "headers": {**server.headers, "content-type": "application/json"}} \
                if isinstance(body, bytes) else {"json": body, "headers": server.headers}
            return httpx.post(f"{server.base}/v1/{path}", timeout=120, **kwargs)

        answers = list(pool.map(send, BAD_REQUESTS))
        reply = good.result(timeout=300)
    for (what, _, _, status, words), resp in zip(BAD_REQUESTS, answers, strict=True):
        assert resp.status_code == status, f"{what}: {resp.status_code} {resp.text}"
        assert words in resp.json()["error"]["message"], f"{what}: {resp.text}"
    assert reply.usage.completion_tokens == 48


def test_repeated_greedy_request_is_answered_from_the_cache(server):
    client = server.client()
    before = httpx.get(f"{server.base}/v1/cache/stats", headers=server.headers).json()
    ask = {"model": "tiny", "prompt": "cache me: 5+5=", "max_tokens": 12, "temperature": 0}
    first = client.completions.with_raw_response.create(**ask)
    second = client.completions.with_raw_response.create(**ask)
    assert (first.headers["x-llmc-cache"], second.headers["x-llmc-cache"]) == ("miss", "hit")
    assert first.parse().choices[0].text == second.parse().choices[0].text
    sampled = client.completions.with_raw_response.create(**{**ask, "temperature": 0.8})
    assert "x-llmc-cache" not in sampled.headers  # only deterministic requests are cached
    after = httpx.get(f"{server.base}/v1/cache/stats", headers=server.headers).json()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"] + 1
    assert after["entries"] <= after["max_entries"]


def test_the_response_cache_is_scoped_per_api_key(server):
    """A hit would tell one key holder what another asked: each key has its own entries."""
    ask = {"model": "tiny", "prompt": "tenant A asked: 3+4=", "max_tokens": 6, "temperature": 0}
    mine, theirs = server.client(), server.client(key=server.other_key)
    first = mine.completions.with_raw_response.create(**ask)
    other = theirs.completions.with_raw_response.create(**ask)
    again = mine.completions.with_raw_response.create(**ask)
    assert [r.headers["x-llmc-cache"] for r in (first, other, again)] == ["miss", "miss", "hit"]
    assert first.parse().choices[0].text == other.parse().choices[0].text == again.parse().choices[0].text
    assert theirs.completions.with_raw_response.create(**ask).headers["x-llmc-cache"] == "hit"  # its own entry


# lm-evaluation-harness' log-likelihood request (its `local-completions` model): the prompt's log-probabilities.
ECHO_LOGPROBS = {"prompt": "12+7=19", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}


def test_prompt_logprobs_are_refused_with_a_400_naming_why_and_the_engine_keeps_answering(server):
    """With LoRA enabled, vLLM's engine died on concurrent echo+logprobs requests (prompt log-probabilities through
    the LoRA logits path, batch of more than one): they are refused, for the base model and an adapter alike, while
    other clients are answered; generated-token logprobs are still served."""
    refused = [("completions", {"model": model, **ECHO_LOGPROBS}, "echo") for model in ("tiny", "tiny", "tiny:arith",
                                                                                         "tiny:arith")]
    refused += [("completions", {"model": "tiny", "prompt": "1+1=", "prompt_logprobs": 0, "max_tokens": 1},
                 "prompt_logprobs"),
                ("chat/completions", {"model": "tiny:arith", "messages": [{"role": "user", "content": "1+1="}],
                                      "echo": True, "max_tokens": 1}, "echo")]
    served = [("completions", {"model": model, "prompt": f"{i}+2=", "max_tokens": 16, "temperature": 0.7,
                               "ignore_eos": True}, None) for i, model in enumerate(["tiny", "tiny:arith"] * 2)]

    def send(case):
        path, body, _ = case
        return httpx.post(f"{server.base}/v1/{path}", json=body, headers=server.headers, timeout=120)

    # The adapter loaded first, alone: Ray Serve LLM answers 500 to concurrent first requests of an adapter that is
    # not loaded yet ("has already been loaded"), a race of its own, not the one under test.
    assert send(served[1]).status_code == 200
    for _ in range(2):  # twice: a dead engine would fail the second round
        with ThreadPoolExecutor(max_workers=len(refused) + len(served)) as pool:
            answers = list(pool.map(send, refused + served))
        for (path, _, field), resp in zip(refused + served, answers, strict=True):
            if field is None:
                assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 16, resp.text
                continue
            error = resp.json()["error"]
            assert resp.status_code == 400 and error["param"] == field, f"{path}: {resp.status_code} {resp.text}"
            assert "LoRA adapters enabled" in error["message"]
    sampled = send(("completions", {"model": "tiny:arith", "prompt": "12+7=", "logprobs": 2, "max_tokens": 3}, None))
    assert sampled.status_code == 200, sampled.text
    assert len(sampled.json()["choices"][0]["logprobs"]["token_logprobs"]) == 3  # the generated tokens' only
    assert httpx.get(f"{server.base}/health", timeout=60).status_code == 200


def test_lm_evaluation_harness_generates_against_the_server_and_reports_the_log_likelihood_refusal(
        server, tiny_model_dir, monkeypatch):
    """lm-evaluation-harness as the reference client (`local-completions`, 4 concurrent requests) on the bundled task
    files in tests/lm_eval_tasks: the generation task completes with the server's own greedy answers; the
    log-likelihood task stops on our 400, whose message lm_eval logs."""
    import logging

    import aiohttp
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = TaskManager(include_path=str(REPO / "tests/lm_eval_tasks"), include_defaults=False)
    model_args = {"model": "tiny", "base_url": f"{server.base}/v1/completions", "tokenizer": str(tiny_model_dir),
                  "tokenizer_backend": "huggingface", "tokenized_requests": False, "num_concurrent": 4,
                  "max_retries": 1, "header": server.headers, "max_length": 512}
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=["llmc_arith_gen"],
                                  task_manager=tasks, log_samples=True)
    samples = out["samples"]["llmc_arith_gen"]
    score = out["results"]["llmc_arith_gen"]["exact_match,none"]
    assert len(samples) == 8 and score == sum(s["exact_match"] for s in samples) / 8
    client = server.client()
    for sample in samples[:3]:  # what lm_eval scored is what the server answers
        direct = client.completions.create(model="tiny", prompt=sample["doc"]["question"], max_tokens=8,
                                           temperature=0, stop=["\n"])
        assert sample["filtered_resps"][0] == direct.choices[0].text

    logged: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("lm_eval").addHandler(handler)
    try:
        with pytest.raises(aiohttp.ClientResponseError) as refused:
            lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=["llmc_arith_choice"],
                                    task_manager=tasks)
    finally:
        logging.getLogger("lm_eval").removeHandler(handler)
    assert refused.value.status == 400
    assert any("Status code: 400" in line and "LoRA adapters enabled" in line for line in logged), logged[-3:]
    assert httpx.get(f"{server.base}/health", timeout=60).status_code == 200


def test_load_200_requests_at_concurrency_32_all_succeed(server, capsys):
    client = server.client()

    def one(i: int) -> float:
        start = time.perf_counter()
        out = client.completions.create(model="tiny", prompt=f"{i % 50}+{i % 7}=", max_tokens=32, temperature=0.7)
        assert out.choices[0].text is not None and out.usage.completion_tokens > 0
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=32) as pool:
        latencies = sorted(pool.map(one, range(200)))
    wall = time.perf_counter() - start
    p50, p99 = statistics.median(latencies), percentile(latencies, 99)
    with capsys.disabled():  # shown in the test run's output, not only on failure
        print(f"\nload: 200 requests at concurrency 32 in {wall:.1f}s, p50 {p50:.2f}s, p99 {p99:.2f}s")
    assert len(latencies) == 200


def test_serving_metrics_count_what_the_ingress_answered_and_a_burst_beyond_the_queue_gets_quick_503s(server,
                                                                                                        ray_cluster,
                                                                                                        capsys):
    """`llmc_serve_*` counters match the requests sent, a burst beyond the queue included (shed with 503, not left
    hanging); vLLM's and Serve's series (those Grafana reads) are there."""
    from cluster.metrics import scrape, total
    from tests.test_monitoring import dashboard_series

    def counts() -> dict[str, float]:
        samples = scrape(ray_cluster.metrics_url)
        return {
            "unauthorized": total(samples, "ray_llmc_serve_unauthorized_total"),
            "reason=api_key": total(samples, "ray_llmc_serve_client_errors_total", reason="api_key"),
            "reason=max_tokens": total(samples, "ray_llmc_serve_client_errors_total", reason="max_tokens"),
            "completions 401": total(samples, "ray_llmc_serve_requests_total", route="/v1/completions", code="401"),
            "completions 200": total(samples, "ray_llmc_serve_requests_total", route="/v1/completions", code="200"),
            "cache hits": total(samples, "ray_llmc_serve_cache_hits_total"),
            "cache misses": total(samples, "ray_llmc_serve_cache_misses_total"),
            "shed": total(samples, "ray_llmc_serve_shed_total"),
        }

    def settled() -> dict[str, float]:
        """Counts once earlier tests' requests have reached the export: two reads an export interval apart agree."""
        previous = counts()
        for _ in range(20):
            time.sleep(12)  # Ray's export interval is about 10 s (shorter, and gauges refreshed less often vanish)
            now = counts()
            if now == previous:
                return now
            previous = now
        raise AssertionError(f"the ingress counters never settled: {previous}")

    before = settled()
    url, body = f"{server.base}/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4}
    codes = [httpx.post(url, json=body, headers=h).status_code for h in ({}, {"Authorization": "Bearer no"}, {})]
    codes += [httpx.post(url, json={**body, "max_tokens": -5}, headers=server.headers).status_code for _ in range(2)]
    assert codes == [401, 401, 401, 400, 400]
    ask = {"model": "tiny", "prompt": f"metrics {secrets.token_hex(4)}: 1+1=", "max_tokens": 4, "temperature": 0}
    caching = [server.client().completions.with_raw_response.create(**ask).headers["x-llmc-cache"] for _ in range(2)]
    assert caching == ["miss", "hit"]
    limits = load_recipe(RECIPE).autoscaling
    capacity = limits.max_ongoing_requests + limits.max_queued_requests

    async def timed(client: httpx.AsyncClient, i: int) -> tuple[int, str, float]:
        answer = await client.post(url, headers=server.headers, json={
            **body, "prompt": f"{i}+2=", "max_tokens": 384, "temperature": 1.0, "ignore_eos": True})
        return answer.status_code, answer.text, time.monotonic()

    async def burst() -> list[tuple[int, str, float]]:  # twice what the app admits: the rest get a quick 503
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=2 * capacity)) as client:
            return await asyncio.gather(*(timed(client, i) for i in range(2 * capacity)))

    start = time.monotonic()
    answers = asyncio.run(burst())
    shed = [code for code, _, _ in answers]
    assert set(shed) <= {200, 503} and shed.count(503) > 0 and shed.count(200) > 0, shed
    assert all("backpressure" in text for code, text, _ in answers if code == 503)
    with capsys.disabled():  # shown in the test run's output, not only on failure
        print(f"\nburst of {len(shed)}: {shed.count(200)} answered, {shed.count(503)} shed with 503 (the last after "
              f"{max(t for c, _, t in answers if c == 503) - start:.1f} s; the first answer after "
              f"{min(t for c, _, t in answers if c == 200) - start:.1f} s)")
    # Admitted: at least the caller's queue (it waits for a free slot, and it was empty when the burst began). How
    # many more depends on the slots that free while the burst is still arriving, so no ceiling is asserted: a CI run
    # admitted 141 of 160, 13 over every replica's slots plus the queue. 384-token answers (not 96) hold their slots
    # longer, so more of the burst is shed, but slots still free as it arrives: one clean-clone run here got its
    # last 503 after 7.6 s and its first answer after 7.3 s.
    assert shed.count(200) >= limits.max_queued_requests
    expected = {"unauthorized": 3, "reason=api_key": 3, "reason=max_tokens": 2, "completions 401": 3,
                "completions 200": 2 + shed.count(200), "cache hits": 1, "cache misses": 1, "shed": shed.count(503)}
    deadline, seen = time.monotonic() + 120, {}
    while time.monotonic() < deadline:  # counters reach the export on Ray's export interval (~10 s)
        now = counts()
        seen = {k: now[k] - before[k] for k in expected}
        if seen == expected:
            break
        time.sleep(3)
    assert seen == expected
    names = {name for name, _, _ in scrape(ray_cluster.metrics_url)}
    assert any(n.startswith("ray_vllm_") for n in names) and any(n.startswith("ray_serve_") for n in names)
    missing = {n for n in dashboard_series() if n.startswith(("ray_vllm_", "ray_serve_"))} - names
    assert not missing, f"the Grafana dashboard reads series this cluster does not export: {sorted(missing)}"


def test_llmc_status_shows_the_serve_app_with_replicas_autoscaling_and_url(server, ray_cluster):
    recipe = load_recipe(RECIPE)
    result = run_llmc("status", "--address", ray_cluster.dashboard_url, "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    app = next(a for a in json.loads(result.stdout)["serve"] if a["name"] == "llmc")
    engine = next(d for d in app["deployments"] if d["name"] == "LLMServer:tiny")
    assert app["status"] == "RUNNING" and app["url"] == f"{server.base}/"
    assert engine["running_replicas"] >= 1 and engine["target_replicas"] >= 1
    assert (engine["min_replicas"], engine["max_replicas"], engine["target_ongoing_requests"]) == (
        recipe.autoscaling.min_replicas, recipe.autoscaling.max_replicas, recipe.autoscaling.target_ongoing_requests)
    table = run_llmc("status", "--address", ray_cluster.dashboard_url, timeout=120)
    assert table.returncode == 0 and "LLMServer:tiny" in table.stdout and server.base in table.stdout, table.stdout


def test_autoscaler_adds_a_replica_under_sustained_load(server, ray_cluster):
    """The controller's decision, not a second running engine: on 2 cores the new engine starts slowly."""
    import ray

    from cluster import serve as cluster_serve

    ray.init(address=ray_cluster.address, ignore_reinit_error=True, log_to_driver=False)

    def replicas() -> dict:
        return cluster_serve.status()["deployments"]["LLMServer:tiny"]

    # Sustained: a shed request (503) or a timeout is counted and its thread goes on asking.
    long_request = {"prompt": "1+1=", "max_tokens": 48, "temperature": 0.7, "extra_body": {"ignore_eos": True}}
    seen, deadline = replicas(), time.monotonic() + 300  # once in 7 runs, 180 s of load went by undecided
    with Load(server, threads=32, request=long_request, timeout_s=60) as load:
        while time.monotonic() < deadline:
            seen = replicas()
            if sum(seen["replicas"].values()) >= 2 or seen["status"] == "UPSCALING":
                break
            time.sleep(1)
    print(f"\nautoscaler: {json.dumps(seen)}; requests: {load.outcomes()}")
    assert load.outcomes().get("ok", 0) > 0, load.outcomes()
    assert sum(seen["replicas"].values()) >= 2 or seen["status"] == "UPSCALING", seen


def test_llmc_chat_streams_from_the_endpoint_with_the_key_from_the_environment(server):
    result = run_llmc("chat", "--url", f"{server.base}/v1", "--api-key-env", "LLMC_CHAT_KEY", "--max-tokens", "24",
                      stdin="What is 12 plus 30?\n/reset\nWhat is 7 plus 58?\n", env={"LLMC_CHAT_KEY": server.key},
                      timeout=300)
    assert result.returncode == 0, result.stderr
    assert "chatting with tiny at" in result.stderr  # the first model the endpoint lists
    replies = [line for line in result.stdout.splitlines() if line.startswith("model> ")]
    assert [final_number(r) for r in replies] == [42, 65], replies
    assert server.key not in result.stdout + result.stderr


def test_api_key_never_appears_in_logs(server, ray_cluster):
    assert any("[llmc] auth: bearer key required" in line for line in server.lines)
    assert not any(server.key in line for line in server.lines)
    chatter = [line for line in server.lines if line.startswith("INFO") or "Deployment Options" in line]
    assert not chatter, chatter[:5]  # Serve's own INFO lines go to its log files unless --verbose
    leaked = []
    for path in Path(ray_cluster.temp_dir).rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err", ".txt", ".json"):
            with path.open("rb") as handle:
                if server.key.encode() in handle.read():
                    leaked.append(str(path))
    assert not leaked, leaked


# ---------------------------------------------------------------------------------------------
# Replica failures under load (last: they kill this module's replicas)
# ---------------------------------------------------------------------------------------------

REQUEST_TIMEOUT_S = 30  # each load request's own limit (openai client, no retries)
RECOVERY_BOUND_S = 300  # the endpoint answers again within this after a replica is killed


class Load:
    """Client threads that keep asking until stopped, recording (start, end, outcome) of every request.

    A failing request (500, 503, timeout, dropped connection) is counted and the thread goes on, after a
    short pause, so the load lasts through a failure instead of ending at its first exception.
    """

    def __init__(self, server: Server, threads: int = 6, request: dict | None = None,
                 timeout_s: float = REQUEST_TIMEOUT_S):
        self._client = server.client().with_options(timeout=timeout_s, max_retries=0)
        self._request = request
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.requests: list[tuple[float, float, str]] = []
        self._threads = [threading.Thread(target=self._ask, daemon=True) for _ in range(threads)]

    def _ask(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                request = self._request or {"prompt": f"{secrets.randbelow(90)}+7=", "max_tokens": 24,
                                            "temperature": 0.8}
                self._client.completions.create(model="tiny", **request)
                outcome = "ok"
            except openai.APIStatusError as exc:
                outcome = str(exc.status_code)
            except openai.APIError as exc:  # timeout, connection dropped
                outcome = type(exc).__name__
            with self._lock:
                self.requests.append((start, time.monotonic(), outcome))
            if outcome != "ok":
                time.sleep(0.5)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._timeout_s + 30)
        assert not any(t.is_alive() for t in self._threads), "a load thread hangs"

    def outcomes(self) -> dict[str, int]:
        """How many requests ended how: "ok", an HTTP status, or the client error's name."""
        with self._lock:
            done = [outcome for _, _, outcome in self.requests]
        return {outcome: done.count(outcome) for outcome in sorted(set(done))}

    def first_success_after(self, moment: float) -> float | None:
        with self._lock:
            ends = [end for start, end, outcome in self.requests if outcome == "ok" and start > moment]
        return min(ends) if ends else None


def replica_processes(deployment: str) -> dict[int, list[int]]:
    """pid of each live replica actor of `deployment` in app llmc -> pids of its child processes (vLLM's engine)."""
    import psutil
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:llmc:{deployment}"), ("state", "=", "ALIVE")])
    found = {}
    for actor in actors:
        try:
            found[actor.pid] = [c.pid for c in psutil.Process(actor.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def _alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def kill_under_load(server: Server, ray_cluster, deployment: str, capsys) -> None:
    """SIGKILL every replica of `deployment` while clients ask; check the aftermath and print the recovery time."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False)
    server.client().completions.create(model="tiny", prompt="1+1=", max_tokens=4)  # it answers before the kill
    victims = replica_processes(deployment)
    assert victims, f"no live replica of {deployment}"
    with Load(server) as load:
        time.sleep(5)  # requests in flight
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        recovered = None
        while recovered is None and time.monotonic() - killed_at < RECOVERY_BOUND_S:
            time.sleep(1)
            recovered = load.first_success_after(killed_at)
    in_flight = [(s, e, o) for s, e, o in load.requests if s < killed_at < e]
    outcomes = load.outcomes()
    with capsys.disabled():
        print(f"\n{deployment} replica killed under load: endpoint answered again after "
              f"{'%.1f s' % (recovered - killed_at) if recovered else 'NEVER'}; in flight at the kill: "
              f"{sorted(o for _, _, o in in_flight)}; all requests: {outcomes}; processes under the killed "
              f"replicas: {sum(len(c) for c in victims.values())}")
    assert recovered is not None, f"no answer within {RECOVERY_BOUND_S}s of the kill: {outcomes}"
    assert in_flight, "no request was in flight at the kill"
    slowest = max(end - start for start, end, _ in load.requests)
    assert slowest <= REQUEST_TIMEOUT_S + 15, f"a request took {slowest:.0f}s (limit {REQUEST_TIMEOUT_S}s)"
    replacements = replica_processes(deployment)
    assert replacements and not set(replacements) & set(victims), (victims, replacements)
    deadline = time.monotonic() + 30  # a killed replica's engine process notices its parent is gone within seconds
    while (orphans := _alive([pid for children in victims.values() for pid in children])) and \
            time.monotonic() < deadline:
        time.sleep(1)
    assert not orphans, f"processes of the killed replicas still run: {orphans}"
    server.client().completions.create(model="tiny", prompt="2+2=", max_tokens=4)


# First on the served model: its only engine replica is killed, not two at once after a scale-up (on 2 cores two
# engines starting together take about twice as long as one).
@pytest.mark.first_on_server
def test_killed_ingress_replica_is_replaced_and_requests_end_within_their_timeout(server, ray_cluster, capsys):
    kill_under_load(server, ray_cluster, "ingress", capsys)


@pytest.mark.first_on_server
def test_killed_engine_replica_is_replaced_and_requests_end_within_their_timeout(server, ray_cluster, capsys):
    kill_under_load(server, ray_cluster, "LLMServer:tiny", capsys)


def test_a_route_prefix_names_its_own_app_and_url_and_a_bad_one_is_refused_naming_the_field():
    from workloads.serve.deploy import build_spec

    recipe = load_recipe(RECIPE, ["server.route_prefix=/smollm2"])
    spec = build_spec(recipe, recipe.model.name, None, {}, [])
    assert spec.url.endswith(f":{recipe.server.port}/smollm2/v1") and spec.app_name == "llmc-smollm2"
    default = build_spec(load_recipe(RECIPE), recipe.model.name, None, {}, [])
    assert default.url.endswith(f":{recipe.server.port}/v1") and default.app_name == "llmc"
    for bad in ("smollm2", "/smollm2/", "/a b"):
        with pytest.raises(RecipeError, match="server.route_prefix"):
            load_recipe(RECIPE, [f"server.route_prefix={bad}"])
