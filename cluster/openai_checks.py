"""Request fields checked against the OpenAI API's rules before a request reaches the engine.

The request models parse types; these checks add the ranges, enums and message structure the OpenAI API
documents, so a malformed request gets a 400 naming its field instead of an engine error or a silent answer; and
one rule of the engine: no prompt log-probabilities while LoRA is enabled (they crash vLLM, `_prompt_logprobs`).
Pure functions of the request's fields: no Ray, no server, so each rule is tested on its own.
"""

from __future__ import annotations

from typing import Any

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
# field -> (lowest, highest, whether the lowest itself is allowed); both endpoints.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, True),
    "frequency_penalty": (-2.0, 2.0, True),
    "n": (1, 128, True),
}
_COMPLETION_RANGES = {"logprobs": (0, 5, True), "best_of": (1, 20, True)}
_CHAT_RANGES = {"top_logprobs": (0, 20, True)}


def problem(kind: str, fields: dict[str, Any], *, lora_enabled: bool) -> tuple[str, str] | None:
    """(field, message) for the first rule `fields` breaks, or None. `kind` is "completions" or "chat";
    `lora_enabled`: the engine serves LoRA adapters (it then cannot compute prompt log-probabilities safely)."""
    ranges = {**_RANGES, **(_COMPLETION_RANGES if kind == "completions" else _CHAT_RANGES)}
    for name, (low, high, low_ok) in ranges.items():
        value = fields.get(name)
        if value is None or isinstance(value, bool):
            continue
        if value < low or value > high or (value == low and not low_ok):
            bound = f"{'at least' if low_ok else 'above'} {low:g} and at most {high:g}"
            return name, f"{name} must be {bound}, got {value}"
    checks = (_stop, _logit_bias, _stream_options, _prompt if kind == "completions" else _messages)
    for check in checks:
        found = check(fields)
        if found:
            return found
    if kind == "completions" and fields.get("best_of") is not None and fields["best_of"] < (fields.get("n") or 1):
        return "best_of", f"best_of ({fields['best_of']}) must be at least n ({fields.get('n')})"
    if kind == "chat" and fields.get("top_logprobs") is not None and not fields.get("logprobs"):
        return "top_logprobs", "top_logprobs needs logprobs: true"
    if lora_enabled:
        return _prompt_logprobs(kind, fields)
    return None


def _prompt_logprobs(kind: str, fields: dict) -> tuple[str, str] | None:
    """vLLM computes prompt log-probabilities (`prompt_logprobs`, or `echo` with `logprobs`; in chat `echo` alone, as
    `top_logprobs` defaults to 0) through its LoRA logits path with one adapter index per request of the batch, not per
    prompt token: with two requests or more in the batch (of any kind) the CPU path fails and the engine dies."""
    echo_logprobs = fields.get("logprobs") if kind == "completions" else fields.get("top_logprobs", 0)
    if fields.get("prompt_logprobs") is not None:
        name = "prompt_logprobs"
    elif fields.get("echo") and echo_logprobs is not None:
        name = "echo"
    else:
        return None
    return name, (f"{name}: prompt log-probabilities (prompt_logprobs, or echo with logprobs) are not served while "
                  "this server has LoRA adapters enabled: the engine computes them wrongly in a batch and fails; "
                  "ask a server with adapters.enabled: false")


def _stop(fields: dict) -> tuple[str, str] | None:
    stop = fields.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
        return "stop", f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}"
    if (isinstance(stop, list) and any(not s for s in stop)) or stop == "":
        return "stop", "stop sequences must not be empty"
    return None


def _logit_bias(fields: dict) -> tuple[str, str] | None:
    for token, bias in (fields.get("logit_bias") or {}).items():
        if not -100 <= bias <= 100:
            return "logit_bias", f"logit_bias values must be between -100 and 100, got {bias} for token {token}"
    return None


def _stream_options(fields: dict) -> tuple[str, str] | None:
    if fields.get("stream_options") is not None and not fields.get("stream"):
        return "stream_options", "stream_options is only allowed with stream: true"
    return None


def _prompt(fields: dict) -> tuple[str, str] | None:
    prompt = fields.get("prompt")
    if prompt in ("", []) or (isinstance(prompt, list) and any(p in ("", []) for p in prompt)):
        return "prompt", "prompt must not be empty"
    return None


def _messages(fields: dict) -> tuple[str, str] | None:
    messages = fields.get("messages")
    if not messages:
        return "messages", "messages must be a non-empty list"
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            return f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            return f"messages[{i}].content", f"messages[{i}].content is required for role {role!r}"
        if role == "tool" and not message.get("tool_call_id"):
            return f"messages[{i}].tool_call_id", f"messages[{i}] (role 'tool') needs tool_call_id"
    return None
