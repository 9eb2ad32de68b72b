"""Reward functions for the RL methods: the built-ins, `module:function` names from a recipe, and their weighted sum.

One signature for every reward function: `fn(prompt, completion, reference, **args) -> float`, where `prompt` is
the chat messages the policy answered (a list of `{role, content}`), `completion` the policy's reply as text,
`reference` the data row's reference answer (its last assistant turn) and `args` the term's `args` from the recipe.
Completions are only ever read as text: nothing here runs them. A trained reward model (`method: reward`'s output)
is a term too, scored in batches through `load_reward_model(path).score`.

A recipe is checked without running any of its code (`check_function`): a `module:function` name must name a module
file on the Python path that defines the function at its top level, read as source with `ast`, never imported, so
validating an untrusted recipe runs nothing of it; a plain `def`'s parameters are checked against the term's args
there too. The module is imported only when the run starts (`resolve_function`), where a function that is not
callable or cannot take (prompt, completion, reference, **args) is refused. This module imports no torch: the recipe
schema imports it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
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


def check_function(name: str) -> inspect.Signature | None:
    """Check a recipe's reward function name without running any of its code: a built-in, or `module:function` whose
    module's source, found on the Python path without importing it or its packages, defines `function` at its top
    level. Returns the function's signature where the source shows it (a built-in, a plain top-level `def`), else
    None (a name bound otherwise is checked when the run imports it).

    Raises ValueError saying what is wrong (the recipe schema names the field).
    """
    module_name, attr = _split(name)
    if module_name is None:
        return inspect.signature(BUILTINS[attr])
    spec = _find_spec(module_name, name)
    try:
        source = spec.loader.get_source(spec.name) if spec.loader is not None else None
    except (ImportError, OSError):
        source = None
    if source is None:
        raise ValueError(f"{name!r}: module {module_name!r} has no Python source to check ({spec.origin}): a reward "
                         "function's module must be a .py file")
    try:
        tree = ast.parse(source, filename=spec.origin or module_name)
    except SyntaxError as exc:
        raise ValueError(f"{name!r}: module {module_name!r} does not parse: {exc}") from None
    bindings = [node for node in _top_level(tree.body) if attr in _bound_names(node)]
    if not bindings and not any(isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names)
                                for node in _top_level(tree.body)):
        raise ValueError(f"{name!r}: module {module_name!r} has no {attr!r}")
    last = bindings[-1] if bindings else None
    if isinstance(last, ast.FunctionDef) and len(bindings) == 1 and not last.decorator_list:
        return _signature(last.args)
    return None


def check_arguments(name: str, signature: inspect.Signature, args: dict | None) -> None:
    """ValueError unless a function of `signature` can be called as fn(prompt, completion, reference, **args)."""
    try:
        signature.bind([], "", "", **(args or {}))
    except TypeError as exc:
        raise ValueError(f"{name!r} cannot be called as fn(prompt, completion, reference, **args): {exc}") from None


def import_function(name: str) -> RewardFunction:
    """The reward function a recipe names: a built-in, or `module:function` imported from the Python path (its
    module's code runs: only when the run starts).

    Raises ValueError saying what is wrong: unknown built-in, missing module or function, or not callable.
    """
    module_name, attr = _split(name)
    if module_name is None:
        return BUILTINS[attr]
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
        signature = inspect.signature(fn)
    except ValueError:  # no signature to inspect (some builtins): trust it
        return fn
    check_arguments(name, signature, args)
    return fn


def import_rewards(specs: Sequence[TermSpec]) -> None:
    """When the run starts: import the `module:function` rewards (their code runs now, not at validation) and check
    them as the workers will call them, so a bad one fails before any cluster work, naming its field."""
    from workloads.common.recipe import RecipeError

    for n, spec in enumerate(specs):
        if spec.function is not None:
            try:
                resolve_function(spec.function, spec.args)
            except ValueError as exc:
                raise RecipeError(f"field 'rewards.{n}.function': {exc}") from None


def _split(name: str) -> tuple[str | None, str]:
    """(module, function) of a `module:function` name; (None, name) for a built-in. ValueError if it is neither."""
    if ":" not in name:
        if name not in BUILTINS:
            raise ValueError(f"{name!r} is not a built-in reward ({', '.join(BUILTINS)}) nor a module:function name")
        return None, name
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{name!r}: expected module:function (e.g. mypkg.rewards:correct)")
    return module_name, attr


def _find_spec(module_name: str, name: str) -> ModuleSpec:
    """Where `module_name` would be imported from, found as the import system finds it (the finders on
    `sys.meta_path`, package by package) but without importing its packages, as `importlib.util.find_spec` does:
    so no `__init__.py` runs either."""
    spec, path = None, None
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        module = sys.modules.get(prefix)
        if getattr(module, "__spec__", None) is not None:
            spec = module.__spec__  # imported already: nothing runs by looking at it
        elif depth > 1 and path is None:  # its parent is a module, not a package
            spec = None
        else:
            spec = next((found for finder in sys.meta_path if hasattr(finder, "find_spec")
                         and (found := finder.find_spec(prefix, path)) is not None), None)
        if spec is None:
            raise ValueError(f"{name!r}: module {prefix!r} not found")
        path = spec.submodule_search_locations
    return spec


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """A module's top-level statements, those inside top-level `if`/`try`/`with` blocks included."""
    found = []
    for node in body:
        found.append(node)
        for block in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, block, None)
            if isinstance(node, (ast.If, ast.Try, ast.With, ast.ExceptHandler)) and inner:
                found += _top_level(inner)
    return found


def _bound_names(node: ast.stmt) -> set[str]:
    """The module-level names a statement binds: def, class, assignment, import."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return set()


def _signature(args: ast.arguments) -> inspect.Signature:
    """The signature a `def` with these arguments has (defaults stand in as `...`: only their presence matters)."""
    kind = inspect.Parameter
    positional = [*args.posonlyargs, *args.args]
    defaults = [kind.empty] * (len(positional) - len(args.defaults)) + [...] * len(args.defaults)
    params = [kind(a.arg, kind.POSITIONAL_ONLY if i < len(args.posonlyargs) else kind.POSITIONAL_OR_KEYWORD,
                   default=default) for i, (a, default) in enumerate(zip(positional, defaults, strict=True))]
    if args.vararg:
        params.append(kind(args.vararg.arg, kind.VAR_POSITIONAL))
    params += [kind(a.arg, kind.KEYWORD_ONLY, default=kind.empty if d is None else ...)
               for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        params.append(kind(args.kwarg.arg, kind.VAR_KEYWORD))
    return inspect.Signature(params)


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
    from workloads.common.paths import resolve_path

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
