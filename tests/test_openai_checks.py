"""Every request field rule: a bad value is named; the OpenAI API's own examples pass; prompt log-probabilities are
refused exactly when the engine serves LoRA adapters (the session server's behaviour is in tests/test_serve.py)."""

from __future__ import annotations

import pytest

from cluster.openai_checks import problem

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny", "prompt": "1+1="}

BAD = [
    ("completions", {"temperature": 2.5}, "temperature"),
    ("completions", {"temperature": -0.1}, "temperature"),
    ("completions", {"top_p": 0}, "top_p"),
    ("completions", {"top_p": 1.5}, "top_p"),
    ("completions", {"presence_penalty": 3}, "presence_penalty"),
    ("chat", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {"n": 0}, "n"),
    ("chat", {"n": 500}, "n"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"best_of": 21}, "best_of"),
    ("completions", {"n": 3, "best_of": 2}, "best_of"),
    ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {"stop": [""]}, "stop"),
    ("completions", {"logit_bias": {"12": 101}}, "logit_bias"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": ["ok", ""]}, "prompt"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}, "messages[1].content"),
    ("chat", {"messages": [{"role": "tool", "content": "4"}]}, "messages[0].tool_call_id"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
]


@pytest.mark.parametrize(("kind", "change", "field"), BAD, ids=[f"{k}-{f}-{i}" for i, (k, _, f) in enumerate(BAD)])
def test_each_bad_field_is_named(kind, change, field):
    found = problem(kind, {**(CHAT if kind == "chat" else COMPLETION), **change}, lora_enabled=False)
    assert found is not None and found[0] == field, found
    assert field.split("[")[0] in found[1]


@pytest.mark.parametrize("fields", [
    {**COMPLETION, "temperature": 0, "top_p": 1, "n": 2, "best_of": 3, "logprobs": 5, "stop": ["\n"], "seed": 3},
    {**CHAT, "temperature": 2, "presence_penalty": -2, "logprobs": True, "top_logprobs": 20, "stream": True,
     "stream_options": {"include_usage": True}, "logit_bias": {"50256": -100}},
    {**CHAT, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "4"}]},
])
def test_valid_requests_pass(fields):
    assert problem("chat" if "messages" in fields else "completions", fields, lora_enabled=True) is None


# (kind, fields, the field named when LoRA is enabled, or None: served either way)
PROMPT_LOGPROBS = [
    ("completions", {"echo": True, "logprobs": 1, "max_tokens": 1}, "echo"),  # lm-evaluation-harness' loglikelihood
    ("completions", {"echo": True, "logprobs": 0}, "echo"),
    ("completions", {"prompt_logprobs": 0}, "prompt_logprobs"),
    ("completions", {"echo": True}, None),  # the prompt's text, no log-probabilities
    ("completions", {"logprobs": 5}, None),  # log-probabilities of the generated tokens only
    ("chat", {"echo": True}, "echo"),  # top_logprobs defaults to 0, so vLLM computes the prompt's
    ("chat", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("chat", {"echo": True, "top_logprobs": None}, None),
    ("chat", {"logprobs": True, "top_logprobs": 2}, None),
]


@pytest.mark.parametrize(("kind", "change", "field"), PROMPT_LOGPROBS)
def test_prompt_logprobs_are_refused_only_when_lora_is_enabled(kind, change, field):
    fields = {**(CHAT if kind == "chat" else COMPLETION), **change}
    assert problem(kind, fields, lora_enabled=False) is None
    found = problem(kind, fields, lora_enabled=True)
    if field is None:
        assert found is None
    else:
        assert found[0] == field and "LoRA adapters enabled" in found[1] and "adapters.enabled: false" in found[1]


def test_the_engine_runs_lora_when_adapters_are_stored_or_enabled_by_option():
    from cluster.serve import ServeSpec, lora_enabled

    plain = ServeSpec("tiny", "/m", {"max_model_len": 512}, {}, {})
    assert not lora_enabled(plain)
    assert lora_enabled(ServeSpec("tiny", "/m", {}, {}, {}, lora_uri="s3://bucket/adapters"))
    assert lora_enabled(ServeSpec("tiny", "/m", {"enable_lora": True}, {}, {}))
