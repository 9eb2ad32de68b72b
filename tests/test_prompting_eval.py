"""Prompt evaluation end to end: `llmc eval` against the session's served tiny model (tests/conftest.py `server`,
whose `tiny:arith` adapter is the session's trained LoRA run), and our client against that server shedding load."""

from __future__ import annotations

import json

from tests.conftest import REPO, run_llmc
from workloads.kinds import load_recipe
from workloads.prompting.client import AsyncLLMClient

EVAL_RECIPE = REPO / "workloads/configs/tiny-eval.yaml"
SERVE_RECIPE = REPO / "workloads/configs/serve-tiny.yaml"


def test_llmc_eval_scores_prompt_variants_and_the_fine_tuned_adapter_beats_the_base(server, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", str(EVAL_RECIPE), "--output-dir", str(out), "--set", f"endpoint.base_url={server.base}/v1",
            "--set", "endpoint.api_key_env=LLMC_EVAL_KEY"]
    env = {"LLMC_EVAL_KEY": server.key, "LLMC_CACHE": str(tmp_path / "cache")}
    result = run_llmc(*args, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["variant"]: row for row in summary["variants"]}
    cases = 50
    assert list(rows) == ["base", "base-own-phrasing", "base-styled", "base-few-shot", "adapter", "adapter-voted"]
    for row in rows.values():
        assert row["n"] == cases and row["failures"] == 0, row
        assert 0 <= row["ci95_low"] <= row["accuracy"] <= row["ci95_high"] <= 1, row
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and "mean_contains" in row
    # The base model cannot do the bundled phrasing (it can in its own); the adapter trained on it can, well outside
    # both intervals.
    assert rows["base"]["accuracy"] <= 0.1 < 0.6 <= rows["base-own-phrasing"]["accuracy"], rows
    assert rows["adapter"]["ci95_low"] > rows["base"]["ci95_high"], (rows["base"], rows["adapter"])
    assert summary["best_variant"] in ("adapter", "adapter-voted", "base-own-phrasing")
    assert len({row["accuracy"] for row in rows.values()}) > 1  # variants score differently
    records = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert len(records) == len(rows) * cases
    voted = [r for r in records if r["variant"] == "adapter-voted"]
    assert all(len(r["samples"]) == 5 and 0 < r["confidence"] <= 1 for r in voted)  # one request with n=5 each
    adapter_hits = sum(r["passed"] for r in records if r["variant"] == "adapter")
    assert adapter_hits == round(rows["adapter"]["accuracy"] * cases)  # the summary counts the records
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "variants.csv").exists()
    assert "best: " in result.stdout and "adapter" in result.stdout
    # Temperature-0 requests are cached on disk: a rerun asks the server only for the sampled variant.
    again = run_llmc(*args, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["cache_hits"] == (len(rows) - 1) * cases and rerun["http_requests"] == cases
    assert {r["variant"]: r["accuracy"] for r in rerun["variants"]}["adapter"] == rows["adapter"]["accuracy"]


def test_a_bad_prompt_name_or_test_set_field_is_refused_before_any_request(tmp_path):
    nowhere = "endpoint.base_url=http://127.0.0.1:9/v1"  # never asked: the recipe fails first
    bad_prompt = run_llmc("eval", str(EVAL_RECIPE), "--output-dir", str(tmp_path / "a"),
                          "--set", nowhere, "--set", "variants=[{name: x, prompt: nope}]")
    assert bad_prompt.returncode == 2 and "nope" in bad_prompt.stderr and "arithmetic-bundled" in bad_prompt.stderr
    bad_field = run_llmc("eval", str(EVAL_RECIPE), "--output-dir", str(tmp_path / "b"),
                         "--set", nowhere, "--set", "test_set.reference_field=answer")
    assert bad_field.returncode == 2 and "test_set.reference_field" in bad_field.stderr, bad_field.stderr


def test_the_client_gets_every_case_answered_by_a_server_shedding_load_with_503(server, tmp_path):
    """Twice the server's queue at once: it sheds with 503; the client halves its concurrency, backs off and retries
    until every request is answered."""
    limits = load_recipe(SERVE_RECIPE).autoscaling
    burst = 2 * (limits.max_ongoing_requests + limits.max_queued_requests)
    client = AsyncLLMClient(f"{server.base}/v1", model="tiny", api_key=server.key, max_concurrency=burst,
                            max_retries=30, backoff_s=0.5, max_backoff_s=5, cache=False)
    requests = [{"messages": [{"role": "user", "content": f"{i} + 1"}], "max_tokens": 96, "temperature": 1.0,
                 "extra_body": {"ignore_eos": True}} for i in range(burst)]
    results = client.run_all(requests)
    print(f"\n{burst} requests: {client.stats.retries} retries, concurrency limit {client.stats.limit_history}")
    assert [r.error for r in results] == [None] * burst
    assert all(r.completion_tokens == 96 for r in results)
    assert client.stats.retries > 0 and min(client.stats.limit_history) < burst  # it was shed, and slowed down


def test_batched_completions_answer_each_prompt_as_its_own_request_would(server, tmp_path):
    """The served model answers a prompt array in one request: the same greedy texts and token totals as one
    request per prompt, in a quarter of the requests; each prompt cached on its own; an empty prompt (which the
    server refuses with 400, failing its whole batch) fails alone while its batch-mates are answered."""
    prompts = [f"Q: {a} + {b}\nA:" for a, b in zip(range(3, 15), range(40, 52), strict=True)]
    requests = [{"prompt": p, "max_tokens": 12, "temperature": 0} for p in prompts]

    def client(batch: int, cache: bool = False) -> AsyncLLMClient:
        return AsyncLLMClient(f"{server.base}/v1", model="tiny", api_key=server.key, max_concurrency=4,
                              cache=cache, cache_dir=tmp_path, batch_prompts=batch)

    single, batched = client(1), client(4)
    alone, together = single.run_all(requests), batched.run_all(requests)
    assert [r.text for r in together] == [r.text for r in alone] and all(r.error is None for r in together)
    assert single.stats.http_requests == 12 and batched.stats.http_requests == 3
    assert batched.stats.prompt_tokens == single.stats.prompt_tokens > 0
    assert batched.stats.completion_tokens == single.stats.completion_tokens > 0
    # n samples per prompt (vLLM refuses n > 1 when greedy): with `echo` each text starts with its own prompt
    sampled = batched.run_all([{**r, "n": 2, "temperature": 1.0, "echo": True} for r in requests[:4]])
    assert [len(r.texts) for r in sampled] == [2] * 4 and batched.stats.http_requests == 4
    assert all(text.startswith(prompt) for r, prompt in zip(sampled, prompts, strict=False) for text in r.texts)
    cached = client(4, cache=True)
    cached.run_all(requests[:8])
    again = client(1, cache=True).run_all(requests[:8])  # cached per prompt: a single request finds it
    assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in alone[:8]]
    with_empty = client(4).run_all([*requests[:3], {**requests[3], "prompt": ""}])
    assert [r.text for r in with_empty[:3]] == [r.text for r in alone[:3]]
    assert with_empty[3].error is not None and "400" in with_empty[3].error and "prompt" in with_empty[3].error


def _agent_base_against_tuned(server, tmp_path, prompt: str, cases: int, agents: tuple[str, str]) -> tuple[dict, list]:
    """Evaluate the base (`tiny`) and the agent adapter (`tiny:react`) as agents with `prompt` on `cases` held-out
    questions (agent protocols `agents`). Returns each variant's accuracy and the per-case records."""
    from workloads.kinds import validate_recipe
    from workloads.prompting.endpoint import Endpoint
    from workloads.prompting.harness import evaluate

    recipe = validate_recipe({
        "kind": "eval", "endpoint": {"base_url": f"{server.base}/v1"},
        "test_set": {"path": "workloads/bundled/arithmetic_test.jsonl", "limit": cases},
        "variants": [{"name": name, "prompt": prompt, "agent": agent, "max_steps": 3, "max_tokens": 64, "model": model}
                     for name, agent, model in zip(("base", "tuned"), agents, ("tiny", "tiny:react"), strict=True)],
        "scorers": [{"type": "numeric", "tolerance": 0}]}, kind="eval")
    endpoint = Endpoint(f"{server.base}/v1", server.key, "tiny", f"agent-test-{prompt}")
    summary = evaluate(recipe, endpoint.client(recipe.endpoint), tmp_path, progress=False)
    accuracy = {v["variant"]: v["accuracy"] for v in summary["variants"]}
    return accuracy, [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]


def test_react_agent_succeeds_more_often_after_fine_tuning_on_the_traces(server, tmp_path):
    """Agent mode of the harness on the real endpoint: every case is a ReAct episode (the bundled traces' prompt) with
    the sandboxed calculator. The base writes no usable action (each becomes an Observation stating the format, and
    the episode ends in its step bound); the adapter tuned on the traces (`tiny:react`) calls the tool and answers.
    Measured over 40 held-out questions: base 0, adapter 0.70 (one run of 20 gave 0.45): 40 cases and a floor of 0.35
    keep a miss by chance under 1 in 1,000 at a true rate of 0.6."""
    cases = 40
    accuracy, records = _agent_base_against_tuned(server, tmp_path, "arithmetic-react", cases, ("react", "react"))
    assert accuracy["tuned"] >= 0.35 and accuracy["tuned"] >= accuracy["base"] + 0.3, accuracy
    assert len(records) == 2 * cases and all("agent" in r for r in records)
    for record in records:
        transcript = record["transcript"]
        assert transcript[0]["role"] == "system" and "calculator" in transcript[0]["content"]
        assert transcript[1] == {"role": "user", "content": f"What is {record['reference'].split()[3]} + "
                                                           f"{record['reference'].split()[5].rstrip('.')}?"}
        assert 1 <= record["agent"]["steps"] <= 3
        assert record["agent"]["stop_reason"] in ("final_answer", "max_steps", "no_answer")
        observations = [m["content"] for m in transcript if m["role"] == "user" and m["content"].startswith(
            "Observation:")]
        assert len(observations) == record["agent"]["steps"] - (record["agent"]["stop_reason"] == "final_answer")
    tuned = [r for r in records if r["variant"] == "tuned" and r["passed"]]
    assert all(r["agent"]["tool_calls"] >= 1 for r in tuned), tuned[:1]  # it answered from the calculator


def test_tool_calling_agent_calls_the_endpoints_calculator_right_after_fine_tuning(server, tmp_path):
    """Agent mode with OpenAI tool calling against our server (engine.tool_call_parser: hermes): `tools` forced for
    the base, `auto` for the adapter (it probes the endpoint, which accepts tools). The adapter, tuned on the tool
    traces too, calls the calculator through `tool_calls` with the question's sum, so the tool's result is the
    reference; the base, offered the same tool, calls it on none.

    Its final answers are held to no floor: whether the tiny model copies the tool's result into its answer depends
    on the CPU's float arithmetic (on an AMD EPYC without AVX-512 it answered 3 of 20 right from 19 right results,
    "89" back and "The answer is 97."; where the suite was first calibrated, at least half). Calls it makes reliably;
    the ReAct test above holds the answers from the text protocol's observations to a floor."""
    cases = 20
    _, records = _agent_base_against_tuned(server, tmp_path, "arithmetic-tools", cases, ("tools", "auto"))
    assert len(records) == 2 * cases and {r["agent"]["protocol"] for r in records} == {"tools"}
    right = {"base": 0, "tuned": 0}
    for record in records:
        transcript = record["transcript"]
        calls = [call for m in transcript if m["role"] == "assistant" for call in m.get("tool_calls", [])]
        results = [m["content"] for m in transcript if m["role"] == "tool"]
        assert len(results) == len(calls), transcript  # every call answered with a `tool` message
        if calls:
            assert calls[0]["function"]["name"] == "calculator", transcript
        if record["passed"]:  # an answer counted right came from the calculator
            assert results, transcript
        reference = float(record["reference"].split()[-1].rstrip("."))
        right[record["variant"]] += bool(results) and _number(results[0]) == reference
    # Measured: the adapter 19 of 20 (one call summed the wrong numbers), the base 0.
    assert right["tuned"] >= 0.6 * cases and right["base"] == 0, right


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "Error: ...", for a call the calculator refused
        return None
