"""Tools an agent may call: a registry (name, description, JSON schema, callable) and two safe tools.

The calculator parses with `ast` and walks only numeric literals and arithmetic operators, with bounded sizes,
so a model's Action Input can never run code or exhaust memory. The search tool ranks a user's local corpus
with BM25 (`rank_bm25`). A tool call never raises: every failure comes back as a message for the agent.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Context, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match


@dataclass(frozen=True)
class Tool:
    """A callable the agent can name: `func(**args)` returns the observation text."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    func: Callable[..., str]
    example: dict[str, Any] | None = None  # shown in format hints, e.g. {"expression": "2 + 2"}


@dataclass(frozen=True)
class ToolResult:
    """A tool call's outcome; a refusal or failure is `ok=False` with the reason as the output."""

    ok: bool
    output: str  # the observation: the tool's answer, or what went wrong


class ToolRegistry:
    """Tools by name, with their arguments checked against each tool's JSON schema before a call."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add a tool; its schema is checked once here so a bad schema fails at setup, not mid-episode."""
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is registered twice")
        jsonschema.Draft202012Validator.check_schema(tool.parameters)
        self._tools[tool.name] = tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def validate(self, name: str, args: Any) -> str | None:
        """What is wrong with calling `name` with `args` (unknown tool, schema violation), or None."""
        tool = self._tools.get(name)
        if tool is None:
            return f"unknown tool {name!r}; the tools are: {', '.join(self.names) or 'none'}"
        error = best_match(jsonschema.Draft202012Validator(tool.parameters).iter_errors(args))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            return f"invalid arguments for {name}: {where}: {error.message}"
        return None

    def call(self, name: str, args: Any) -> ToolResult:
        """Validate and run a tool; any exception inside the tool becomes a failed result, never a raise."""
        problem = self.validate(name, args)
        if problem is not None:
            return ToolResult(False, problem)
        try:
            return ToolResult(True, str(self._tools[name].func(**args)))
        except ToolError as exc:
            return ToolResult(False, str(exc))
        except Exception as exc:  # a tool's bug must not end the agent's episode
            return ToolResult(False, f"{name} failed: {type(exc).__name__}: {exc}")

    def describe(self) -> str:
        """One line per tool (name, description, argument schema), for a system prompt."""
        return "\n".join(f"{t.name}: {t.description} Arguments: {json.dumps(t.parameters)}"
                         for t in self._tools.values())

    def openai_tools(self) -> list[dict[str, Any]]:
        """The registry as the `tools=[{"type": "function", ...}]` parameter of a chat completion."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}}
                for t in self._tools.values()]


class ToolError(Exception):
    """A tool's refusal, worded for the agent (it becomes the Observation as is)."""


# ---------------------------------------------------------------------------------------------- calculator

@dataclass(frozen=True)
class CalculatorLimits:
    """Bounds that keep any accepted expression cheap to evaluate."""

    max_length: int = 200  # characters of the expression
    max_depth: int = 50  # nesting of operators (a chain 1+2+...+n nests n deep)
    max_exponent: int = 100  # |exponent| of **
    max_digits: int = 100  # decimal digits of any operand or result (numerator and denominator alike)


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_REFUSED = {
    ast.Name: "names are not allowed", ast.Call: "function calls are not allowed",
    ast.Attribute: "attribute access is not allowed", ast.Subscript: "subscripts are not allowed",
    ast.Lambda: "lambdas are not allowed", ast.Compare: "comparisons are not allowed",
    ast.BoolOp: "boolean operators are not allowed",
}


def calculate(expression: str, limits: CalculatorLimits = CalculatorLimits()) -> Fraction | float:
    """Evaluate arithmetic exactly (ints and decimals as fractions); raises ToolError saying why it refuses."""
    text = expression.strip()
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > limits.max_length:
        raise ToolError(f"the expression is longer than {limits.max_length} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"cannot parse {text!r} as arithmetic") from None
    return _evaluate(tree.body, 1, limits)


def format_number(value: Fraction | float) -> str:
    """`89`, `3.5`, `0.3333333333333333333333333333`: integers exactly, other values as decimals."""
    if isinstance(value, float):
        return repr(value)
    if value.denominator == 1:
        return str(value.numerator)
    decimal = Context(prec=28).divide(Decimal(value.numerator), Decimal(value.denominator))
    return format(decimal.normalize(), "f")


def _evaluate(node: ast.AST, depth: int, limits: CalculatorLimits) -> Fraction | float:
    if depth > limits.max_depth:
        raise ToolError(f"the expression is nested deeper than {limits.max_depth} levels")
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ToolError(f"only numbers are allowed, not {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError("the number is too large")
        return _bounded(Fraction(repr(value)) if isinstance(value, float) else Fraction(value), limits)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, depth + 1, limits))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate(node.left, depth + 1, limits)
        right = _evaluate(node.right, depth + 1, limits)
        if isinstance(node.op, ast.Pow):
            return _power(left, right, limits)
        try:
            return _bounded(_BINARY[type(node.op)](left, right), limits)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result is too large") from None
    for kind, message in _REFUSED.items():
        if isinstance(node, kind):
            raise ToolError(message)
    raise ToolError(f"{type(node).__name__} is not allowed: use numbers and + - * / // % ** only")


def _power(base: Fraction | float, exponent: Fraction | float, limits: CalculatorLimits) -> Fraction | float:
    if abs(exponent) > limits.max_exponent:
        raise ToolError(f"the exponent {format_number(exponent)} is larger than {limits.max_exponent}")
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        # size of the result before computing it: digits(base) * |exponent|
        magnitude = max(abs(base.numerator), base.denominator) if isinstance(base, Fraction) else abs(base)
        if magnitude > 1 and math.log10(magnitude) * abs(exponent) > limits.max_digits:
            raise ToolError(f"the result has more than {limits.max_digits} digits")
        if base == 0 and exponent < 0:
            raise ToolError("division by zero")
        try:
            return _bounded(base ** int(exponent), limits)
        except OverflowError:
            raise ToolError("the result is too large") from None
    if base < 0:
        raise ToolError("a negative number to a fractional power is not a real number")
    try:
        return _bounded(float(base) ** float(exponent), limits)
    except (OverflowError, ZeroDivisionError):
        raise ToolError("the result is too large") from None


def _bounded(value: Fraction | float, limits: CalculatorLimits) -> Fraction | float:
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) >= 10.0 ** limits.max_digits:
            raise ToolError(f"the result has more than {limits.max_digits} digits")
        return value
    if max(abs(value.numerator), value.denominator) >= 10 ** limits.max_digits:
        raise ToolError(f"a number has more than {limits.max_digits} digits")
    return value


def calculator_tool(limits: CalculatorLimits = CalculatorLimits()) -> Tool:
    """The `calculator` tool of the bundled ReAct traces: {"expression": "17 + 72"} -> "89"."""

    def run(expression: str) -> str:
        return format_number(calculate(expression, limits))

    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression with numbers and + - * / // % ** and parentheses.",
        parameters={"type": "object", "properties": {"expression": {"type": "string", "minLength": 1}},
                    "required": ["expression"], "additionalProperties": False},
        func=run, example={"expression": "17 + 72"},
    )


# -------------------------------------------------------------------------------------------------- search

_TOKEN = re.compile(r"\w+")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class CorpusSearch:
    """BM25 over a local corpus: documents are strings or {"text", optional "title"/"id"} dicts."""

    def __init__(self, documents: Sequence[str | dict[str, Any]], snippet_chars: int = 300) -> None:
        from rank_bm25 import BM25Plus  # BM25+ keeps IDF positive, so tiny corpora still rank (Okapi's IDF is 0 there)

        self.documents = [d if isinstance(d, dict) else {"text": d} for d in documents]
        if not self.documents:
            raise ValueError("the search corpus is empty")
        for i, doc in enumerate(self.documents):
            if not isinstance(doc.get("text"), str):
                raise ValueError(f"document {i} has no 'text' string")
        self._tokens = [_tokens(f"{d.get('title', '')} {d['text']}") for d in self.documents]
        self._bm25 = BM25Plus(self._tokens)
        self.snippet_chars = snippet_chars

    @classmethod
    def from_file(cls, path: str | Path, snippet_chars: int = 300) -> CorpusSearch:
        """A `.jsonl` file (one {"text": ...} object per line) or a text file of blank-line-separated documents."""
        path = Path(path)
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            docs: list[str | dict[str, Any]] = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            docs = [block.strip() for block in re.split(r"\n\s*\n", raw) if block.strip()]
        return cls(docs, snippet_chars)

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        """(document index, score) of the best `k` documents sharing at least one word with the query."""
        words = _tokens(query)
        if not words:
            return []
        scores = self._bm25.get_scores(words)
        wanted = set(words)
        hits = [i for i, toks in enumerate(self._tokens) if wanted.intersection(toks)]
        hits.sort(key=lambda i: (-scores[i], i))
        return [(i, float(scores[i])) for i in hits[:k]]

    def __call__(self, query: str, k: int = 3) -> str:
        hits = self.search(query, k)
        if not hits:
            return f"no document matches {query!r}"
        lines = []
        for rank, (i, _) in enumerate(hits, 1):
            doc = self.documents[i]
            text = " ".join(doc["text"].split())
            text = text if len(text) <= self.snippet_chars else text[: self.snippet_chars].rstrip() + "..."
            title = f"{doc['title']}: " if doc.get("title") else ""
            lines.append(f"[{rank}] {title}{text}")
        return "\n".join(lines)


def search_tool(corpus: CorpusSearch | Sequence[str | dict[str, Any]] | str | Path, max_k: int = 10) -> Tool:
    """The `search` tool over a corpus (a CorpusSearch, a list of documents, or a .jsonl/.txt path)."""
    if isinstance(corpus, str | Path):
        index = CorpusSearch.from_file(corpus)
    elif isinstance(corpus, CorpusSearch):
        index = corpus
    else:
        index = CorpusSearch(corpus)
    return Tool(
        name="search",
        description="Search the local document collection; returns the best matching passages.",
        parameters={"type": "object",
                    "properties": {"query": {"type": "string", "minLength": 1},
                                   "k": {"type": "integer", "minimum": 1, "maximum": max_k}},
                    "required": ["query"], "additionalProperties": False},
        func=index, example={"query": "capital of France"},
    )


def default_registry(corpus: CorpusSearch | Sequence[str | dict[str, Any]] | str | Path | None = None) -> ToolRegistry:
    """The calculator, plus `search` when a corpus is given."""
    tools = [calculator_tool()]
    if corpus is not None:
        tools.append(search_tool(corpus))
    return ToolRegistry(tools)
