"""Reward functions for PPO and GRPO: the built-ins, `module:function` names from a recipe, and their weighted sum.

One signature for every reward function: `fn(prompt, completion, reference, **args) -> float`, where `prompt` is
the chat messages the policy answered (a list of `{role, content}`), `completion` the policy's reply as text,
`reference` the data row's reference answer (its last assistant turn) and `args` the term's `args` from the recipe.
Completions are only ever read as text: nothing here runs them. A trained reward model (`method: reward`'s output)
is a term too, scored in batches through `load_reward_model(path).score`.

Function names are resolved when the recipe is validated, so a missing module or function, something not callable,
or a function that does not take (prompt, completion, reference, **args) fails before any work. This module imports
no torch: the recipe schema imports it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from workloads.scoring import build_scorer

RewardFunction = Callable[..., float]  # (prompt: list[dict], completion: str, reference: str, **args) -> float
_ANSWER_LINE = re.compile(r"^[ \t]*Answer:[ \t]*\S", re.MULTILINE)


def exact_answer(prompt: list[dict], completion: str, reference: str) -> float:
    """1.0 when the completion's final number is the reference's (the `final_number` scorer of
    workloads.scoring), else 0.0."""
    return build_scorer({"type": "final_number"}).score(completion, reference)


def answer_format(prompt: list[dict], completion: str, reference: str) -> float:
    """1.0 when some line of the completion starts with `Answer:` and has text after it, else 0.0.

    For prompts that ask for that line. The tiny model never writes one on the bundled task (it answers "The sum of
    a and b is c."), so there this reward is a constant 0: no signal to learn from.
    """
    return float(_ANSWER_LINE.search(completion) is not None)


def length_penalty(prompt: list[dict], completion: str, reference: str, limit: int = 200) -> float:
    """0.0 up to `limit` characters, then falling linearly to -1.0 at twice that (and staying there)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return -min(1.0, max(0, len(completion) - limit) / limit)


BUILTINS: dict[str, RewardFunction] = {"exact_answer": exact_answer, "format": answer_format,
                                       "length_penalty": length_penalty}


def import_function(name: str) -> RewardFunction:
    """The reward function a recipe names: a built-in, or `module:function` imported from the Python path.

    Raises ValueError saying what is wrong (the recipe schema names the field): unknown built-in, missing module or
    function, or not callable.
    """
    if ":" not in name:
        if name not in BUILTINS:
            raise ValueError(f"{name!r} is not a built-in reward ({', '.join(BUILTINS)}) nor a module:function name")
        return BUILTINS[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{name!r}: expected module:function (e.g. mypkg.rewards:correct)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{name!r}: module {exc.name!r} not found") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{name!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"{name!r} is not callable (a {type(fn).__name__})")
    return fn


def resolve_function(name: str, args: dict | None = None) -> RewardFunction:
    """`import_function(name)`, checked to take (prompt, completion, reference, **args); ValueError if not."""
    fn = import_function(name)
    try:
        inspect.signature(fn).bind([], "", "", **(args or {}))
    except TypeError as exc:
        raise ValueError(f"{name!r} cannot be called as fn(prompt, completion, reference, **args): {exc}") from None
    except ValueError:  # no signature to inspect (some builtins): trust it
        pass
    return fn


class TermSpec(Protocol):
    """A recipe's reward term (workloads.align.recipe.RewardTerm): a function or a reward model, and its weight."""

    function: str | None
    model: str | None
    weight: float
    args: dict


@dataclass
class Term:
    """One weighted term, scoring a batch: `score(prompts, completions, references) -> list[float]`."""

    name: str
    weight: float
    score: Callable[[Sequence[list[dict]], Sequence[str], Sequence[str]], list[float]]


class Reward:
    """The weighted sum of a recipe's reward terms; each term's own scores are kept for the metrics."""

    def __init__(self, terms: list[Term]):
        self.terms = terms

    def score(self, prompts: Sequence[list[dict]], completions: Sequence[str],
              references: Sequence[str]) -> tuple[list[float], dict[str, list[float]]]:
        """Total reward per completion, and each term's unweighted scores by term name."""
        parts = {term.name: term.score(prompts, completions, references) for term in self.terms}
        totals = [sum(term.weight * parts[term.name][i] for term in self.terms) for i in range(len(completions))]
        return totals, parts


def function_term(name: str, weight: float, args: dict) -> Term:
    """A reward function as a batch scorer (one call per completion)."""
    fn = resolve_function(name, args)

    def score(prompts, completions, references) -> list[float]:
        return [float(fn(p, c, r, **args)) for p, c, r in zip(prompts, completions, references, strict=True)]

    return Term(name, weight, score)


def model_term(path: str, weight: float, device: str, dtype: str) -> Term:
    """A trained reward model as a batch scorer: it scores prompt plus reply as one conversation."""
    from workloads.align.reward import load_reward_model
    from workloads.config import resolve_path

    model = load_reward_model(resolve_path(path) or path, device=device, dtype=dtype)

    def score(prompts, completions, references) -> list[float]:
        return model.score([[*p, {"role": "assistant", "content": c}] for p, c in zip(prompts, completions,
                                                                                       strict=True)])

    return Term("model", weight, score)


def build_reward(specs: Sequence[TermSpec], device: str = "cpu", dtype: str = "float32") -> Reward:
    """The recipe's `rewards` as one Reward (a reward model is loaded here, onto `device`); the schema has checked
    that the terms' names (`term_name`) differ."""
    return Reward([function_term(s.function, s.weight, s.args) if s.function is not None
                   else model_term(str(s.model), s.weight, device, dtype) for s in specs])


def term_name(spec: TermSpec) -> str:
    """What a term is called in metrics.csv (`reward_<name>`): its function's name, or `model`."""
    return spec.function if spec.function is not None else "model"
