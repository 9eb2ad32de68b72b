"""A ReAct agent: the text protocol (Thought / Action / Action Input / Observation / Final Answer) and OpenAI tools.

The transcript has the layout of the bundled traces (`arithmetic_react_*.jsonl`): the system prompt, the user
question, then assistant turns, each followed by a user message "Observation: ...". A reply the parser cannot use
(no action, unknown tool, bad JSON, arguments failing the tool's schema) becomes an Observation that restates the
expected format, so the model can correct itself; nothing the model writes ends the episode with an exception.
Each loop is one generator (the episode) driven by a sync or an async model callable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workloads.prompting.tools import ToolRegistry

if TYPE_CHECKING:
    from workloads.prompting.client import AsyncLLMClient, Result

REACT_STOP = ["\nObservation:"]  # a real model must stop before writing the Observation itself

Messages = list[dict[str, Any]]

_OBSERVATION = re.compile(r"(?:^|\n)[ \t]*Observation[ \t]*:", re.IGNORECASE)
_FINAL = re.compile(r"(?:^|\n)[ \t]*Final[ \t]*Answer[ \t]*:[ \t]*(.*)", re.IGNORECASE | re.DOTALL)
_THOUGHT = re.compile(r"(?:^|\n)[ \t]*Thought[ \t]*:[ \t]*(.*?)(?=\n[ \t]*(?:Action|Final[ \t]*Answer)\b|\Z)",
                      re.IGNORECASE | re.DOTALL)
_ACTION = re.compile(r"(?:^|\n)[ \t]*Action[ \t]*:[ \t]*(.*)", re.IGNORECASE)
_ACTION_INPUT = re.compile(r"(?:^|\n)[ \t]*Action[ \t]*Input[ \t]*:[ \t]*(.*)", re.IGNORECASE | re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass
class ParsedReply:
    """What one assistant reply says; `error` (an Observation for the model) is set when it cannot be acted on."""

    text: str  # the reply as kept in the transcript: cut before any Observation the model wrote itself
    thought: str | None = None
    action: str | None = None
    action_input: str | None = None
    args: dict[str, Any] | None = None
    final_answer: str | None = None
    error: str | None = None


@dataclass
class Step:
    """One model turn (or one native tool call): what it asked for and the Observation it got back."""

    reply: str
    action: str | None = None
    args: dict[str, Any] | None = None
    observation: str | None = None
    tool_ok: bool = False  # the tool ran and answered
    format_error: bool = False  # the reply could not be acted on


@dataclass
class AgentResult:
    """An episode: the transcript, the final answer (None without one), the steps and why it stopped."""

    messages: Messages
    final_answer: str | None
    steps: list[Step] = field(default_factory=list)
    stop_reason: str = "final_answer"  # final_answer | max_steps | no_answer | model_error
    error: str | None = None  # the model call's exception, for model_error

    @property
    def format_errors(self) -> int:
        return sum(step.format_error for step in self.steps)

    @property
    def tool_calls(self) -> int:
        return sum(step.action is not None and not step.format_error for step in self.steps)


def format_hint(registry: ToolRegistry | None = None) -> str:
    """The expected reply format, with the tool names and an example of arguments when a registry is given."""
    names, sample = "the tool's name", '{"argument": "value"}'
    if registry is not None:
        names = ", ".join(registry.names)
        examples = [tool.example for tool in map(registry.get, registry.names) if tool and tool.example]
        sample = json.dumps(examples[0]) if examples else sample
    return ("Reply in this format:\nThought: what to do next\n"
            f"Action: one of {names}\nAction Input: the arguments as one JSON object, e.g. {sample}\n"
            "Then wait for the Observation. When you know the answer, reply with\n"
            "Thought: I know the answer\nFinal Answer: the answer")


def react_system_prompt(registry: ToolRegistry) -> str:
    """A generic ReAct system prompt listing the tools (the tiny model is trained on the bundled REACT_SYSTEM)."""
    return f"Answer the question. You can use these tools:\n{registry.describe()}\n{format_hint(registry)}"


def parse_reply(text: str, registry: ToolRegistry | None = None) -> ParsedReply:
    """Parse a ReAct reply; with a registry, the tool name and the arguments' schema are checked too."""
    kept = _OBSERVATION.split(text or "", maxsplit=1)[0].rstrip()
    parsed = ParsedReply(text=kept)
    if (thought := _THOUGHT.search(kept)) is not None:
        parsed.thought = thought.group(1).strip()
    final, action = _FINAL.search(kept), _ACTION.search(kept)
    if final is not None and (action is None or final.start() < action.start()):
        parsed.final_answer = final.group(1).strip()
        if not parsed.final_answer:
            parsed.final_answer, parsed.error = None, _problem("the Final Answer is empty", registry)
        return parsed
    if action is None:
        parsed.error = _problem("the reply has neither an Action nor a Final Answer", registry)
        return parsed
    parsed.action = action.group(1).strip().strip("`'\"").rstrip(".").strip()
    if not parsed.action:
        parsed.error = _problem("the Action names no tool", registry)
        return parsed
    if registry is not None and parsed.action not in registry:
        parsed.error = _problem(f"unknown tool {parsed.action!r}", registry)
        return parsed
    action_input = _ACTION_INPUT.search(kept, action.end())
    if action_input is None or not action_input.group(1).strip():
        parsed.error = _problem("the Action Input line with the tool's JSON arguments is missing", registry)
        return parsed
    parsed.action_input = action_input.group(1).strip()
    args, problem = _json_object(parsed.action_input)
    if problem is None and registry is not None:
        problem = registry.validate(parsed.action, args)
    if problem is not None:
        parsed.error = _problem(problem, registry)
        return parsed
    parsed.args = args
    return parsed


def _problem(what: str, registry: ToolRegistry | None) -> str:
    return f"Invalid reply: {what}.\n{format_hint(registry)}"


def _json_object(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    """The Action Input as a JSON object (code fences and trailing text tolerated), or what is wrong with it."""
    raw = _FENCE.sub("", raw.strip())
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        start = raw.find("{")
        try:
            value = json.JSONDecoder().raw_decode(raw[start:])[0] if start >= 0 else None
        except json.JSONDecodeError:
            value = None
        if value is None:
            return None, f"the Action Input is not valid JSON ({exc.msg} at character {exc.pos})"
    if not isinstance(value, dict):
        return None, f"the Action Input must be a JSON object, not {type(value).__name__}"
    return value, None


Episode = Generator[tuple[Any, ...], Any, AgentResult]


def _react_episode(question: str, registry: ToolRegistry, system_prompt: str | None, max_steps: int) -> Episode:
    messages: Messages = [{"role": "system", "content": system_prompt or react_system_prompt(registry)},
                          {"role": "user", "content": question}]
    steps: list[Step] = []
    for _ in range(max_steps):
        try:
            reply = yield (list(messages),)
        except Exception as exc:
            return AgentResult(messages, None, steps, "model_error", f"{type(exc).__name__}: {exc}")
        parsed = parse_reply(reply, registry)
        messages.append({"role": "assistant", "content": parsed.text})
        if parsed.final_answer is not None:
            steps.append(Step(parsed.text))
            return AgentResult(messages, parsed.final_answer, steps, "final_answer")
        step = Step(parsed.text, parsed.action, parsed.args)
        if parsed.error is not None:
            step.observation, step.format_error = parsed.error, True
        else:
            result = registry.call(parsed.action, parsed.args)
            step.observation = result.output if result.ok else f"Error: {result.output}"
            step.tool_ok = result.ok
        messages.append({"role": "user", "content": f"Observation: {step.observation}"})
        steps.append(step)
    return AgentResult(messages, None, steps, "max_steps")


def _tool_calling_episode(question: str, registry: ToolRegistry, system_prompt: str | None,
                          max_steps: int) -> Episode:
    messages: Messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": question}]
    tools, steps = registry.openai_tools(), []
    for _ in range(max_steps):
        try:
            message = yield (list(messages), tools)
        except Exception as exc:
            return AgentResult(messages, None, steps, "model_error", f"{type(exc).__name__}: {exc}")
        message = message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else dict(message)
        content, calls = message.get("content") or "", message.get("tool_calls") or []
        messages.append({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})})
        if not calls:
            steps.append(Step(content))
            if not content.strip():
                return AgentResult(messages, None, steps, "no_answer")
            return AgentResult(messages, content.strip(), steps, "final_answer")
        for call in calls:
            function = call.get("function") or {}
            name = function.get("name") or ""
            args, problem = _json_object(function.get("arguments") or "{}")
            step = Step(content, name, args)
            if problem is None:
                result = registry.call(name, args)
                step.observation, step.tool_ok = (result.output if result.ok else f"Error: {result.output}"), result.ok
                step.format_error = not result.ok and registry.validate(name, args) is not None
            else:
                step.observation, step.format_error = f"Error: {problem}", True
            messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": step.observation})
            steps.append(step)
    return AgentResult(messages, None, steps, "max_steps")


def _drive(episode: Episode, call: Callable[..., Any]) -> AgentResult:
    try:
        request = next(episode)
        while True:
            try:
                reply = call(*request)
            except Exception as exc:
                request = episode.throw(exc)
            else:
                request = episode.send(reply)
    except StopIteration as stop:
        return stop.value


async def _adrive(episode: Episode, call: Callable[..., Awaitable[Any]]) -> AgentResult:
    try:
        request = next(episode)
        while True:
            try:
                reply = await call(*request)
            except Exception as exc:
                request = episode.throw(exc)
            else:
                request = episode.send(reply)
    except StopIteration as stop:
        return stop.value


def run_react(question: str, complete: Callable[[Messages], str], registry: ToolRegistry, *,
              system_prompt: str | None = None, max_steps: int = 6) -> AgentResult:
    """The text-protocol agent over `complete(messages) -> assistant text`, at most `max_steps` model turns."""
    return _drive(_react_episode(question, registry, system_prompt, max_steps), complete)


async def arun_react(question: str, complete: Callable[[Messages], Awaitable[str]], registry: ToolRegistry, *,
                     system_prompt: str | None = None, max_steps: int = 6) -> AgentResult:
    """`run_react` over an async `complete`, so many episodes share one client concurrently."""
    return await _adrive(_react_episode(question, registry, system_prompt, max_steps), complete)


def run_tool_calling(question: str, create: Callable[[Messages, list[dict[str, Any]]], Any], registry: ToolRegistry,
                     *, system_prompt: str | None = None, max_steps: int = 6) -> AgentResult:
    """The native-tools agent over `create(messages, tools) -> assistant message` (a dict or an openai message)."""
    return _drive(_tool_calling_episode(question, registry, system_prompt, max_steps), create)


async def arun_tool_calling(question: str, create: Callable[[Messages, list[dict[str, Any]]], Awaitable[Any]],
                            registry: ToolRegistry, *, system_prompt: str | None = None,
                            max_steps: int = 6) -> AgentResult:
    """`run_tool_calling` over an async `create`."""
    return await _adrive(_tool_calling_episode(question, registry, system_prompt, max_steps), create)


@dataclass
class Usage:
    """The tokens of one episode's own requests, counted as they are answered: episodes running side by side share
    the client, so a difference of its totals would count the others' tokens too. Cache hits count none, as in the
    client's totals."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, result: Result) -> Result:
        """Count `result`'s tokens (unless it came from the cache) and hand it back."""
        if not result.cached:
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens
        return result


def react_completer(client: AsyncLLMClient, usage: Usage | None = None,
                    **params: Any) -> Callable[[Messages], Awaitable[str]]:
    """An async `complete` for `arun_react` from the client (stops before "Observation:" unless told otherwise);
    each answer's tokens go to `usage` when given."""
    params.setdefault("stop", REACT_STOP)
    count = usage.add if usage is not None else (lambda result: result)

    async def complete(messages: Messages) -> str:
        return count(await client.chat(messages, **params)).text

    return complete


async def supports_tool_calling(client: AsyncLLMClient, model: str, registry: ToolRegistry) -> bool:
    """Whether the endpoint answers a chat request offering `tools` (one token) instead of refusing it with 400, as
    vLLM does without a tool-call parser; other failures propagate."""
    import openai

    from workloads.prompting.client import RequestFailed

    try:
        await client.chat([{"role": "user", "content": "2 + 2"}], model=model, tools=registry.openai_tools(),
                          max_tokens=1, temperature=0)
    except RequestFailed as exc:
        if isinstance(exc.__cause__, openai.BadRequestError):
            return False
        raise
    return True


def tool_call_completer(client: AsyncLLMClient, usage: Usage | None = None,
                        **params: Any) -> Callable[..., Awaitable[dict[str, Any]]]:
    """An async `create` for `arun_tool_calling` from the client; each answer's tokens go to `usage` when given."""
    count = usage.add if usage is not None else (lambda result: result)

    async def create(messages: Messages, tools: list[dict[str, Any]]) -> dict[str, Any]:
        return count(await client.chat(messages, tools=tools, **params)).message

    return create
