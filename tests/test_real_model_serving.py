"""SmolLM2-135M-Instruct served by `llmc serve` (vLLM behind Ray Serve) beside the session's tiny model, under its own
route prefix on the same cluster and port: through the `openai` client it answers with exactly the greedy text
in-process transformers gives for the same chat, and `llmc eval` on it shows few-shot prompting beating zero-shot on
JSON extraction."""

from __future__ import annotations

import json
import os
import secrets

import openai
import pytest

from tests.conftest import REPO, run_llmc
from workloads.serve.deploy import ServeProcess

SERVE_RECIPE = REPO / "workloads/configs/smollm2-serve.yaml"
EVAL_RECIPE = REPO / "workloads/configs/smollm2-eval-json.yaml"
# Two of the recipe's variants on 40 held-out items: the baseline and the one-shot prompt (the demo scores the rest).
EVAL_SET = ["variants=[{name: zero-shot, prompt: json-extract, max_tokens: 32}, "
            "{name: one-shot, prompt: json-extract-few-shot, k: 1, max_tokens: 32}]", "test_set.limit=40"]
CHATS = [  # held-out of nothing: any chat the model answers at some length
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about a cat."}],
]


@pytest.fixture(scope="module")
def smollm2_server(server, smollm2_dir):
    """smollm2-serve.yaml at /smollm2 on the port the session's `server` holds (Serve has one HTTP port per cluster),
    with no adapters (the recipe's sentiment adapter is a run's output)."""
    key = "llmc-test-" + secrets.token_hex(12)
    process = ServeProcess(SERVE_RECIPE, port=server.process.port,
                           overrides=["server.route_prefix=/smollm2", "adapters.enabled=false"],
                           env={**os.environ, "LLMC_API_KEYS": key})
    try:
        process.wait_ready(timeout_s=600)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield process.url, key
    process.stop()
    assert process.proc.returncode == 0, "".join(process.lines[-40:])


def test_served_smollm2_answers_with_the_greedy_text_of_transformers(smollm2_server, smollm2_dir, server):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url, key = smollm2_server
    assert url == f"{server.base}/smollm2/v1"
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)
    served = [client.chat.completions.create(model="smollm2", messages=chat, max_tokens=24, temperature=0)
              for chat in CHATS]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for chat, reply in zip(CHATS, served, strict=True):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert reply.choices[0].message.content == expected, chat
        assert reply.usage.completion_tokens == len(out[0]) - ids["input_ids"].shape[1]
    assert "Paris" in served[0].choices[0].message.content
    assert server.client().chat.completions.create(model="tiny", messages=CHATS[0], max_tokens=4).choices  # still /


def test_llmc_eval_on_smollm2_shows_few_shot_beating_zero_shot_on_json_extraction(smollm2_server, tmp_path):
    url, key = smollm2_server
    out = tmp_path / "eval"
    result = run_llmc("eval", str(EVAL_RECIPE), "--output-dir", str(out), "--set", f"endpoint.base_url={url}",
                      "--set", "endpoint.api_key_env=LLMC_EVAL_KEY", *[a for o in EVAL_SET for a in ("--set", o)],
                      env={"LLMC_EVAL_KEY": key, "LLMC_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((out / "summary.json").read_text())["variants"]}
    assert set(rows) == {"zero-shot", "one-shot"}, rows
    assert all(row["n"] == 40 and row["failures"] == 0 for row in rows.values()), rows
    # Measured on 100 held-out items (the skill card): zero-shot 3%, one-shot 71%; greedy, so it repeats.
    assert rows["zero-shot"]["accuracy"] <= 0.2, rows["zero-shot"]
    assert rows["one-shot"]["accuracy"] >= rows["zero-shot"]["accuracy"] + 0.3, rows
    assert rows["one-shot"]["ci95_low"] > rows["zero-shot"]["ci95_high"], rows
