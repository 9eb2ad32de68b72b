"""The prompt-evaluation scorers (contains, regex, choice, json_schema, judge), registered in the one scorer table
(`workloads.scoring.SCORERS`, which holds exact and numeric too); each maps (prediction, case) to a float in [0, 1].

A recipe names a scorer as a mapping such as `{type: numeric, tolerance: 0.01}`; `workloads.scoring.build_scorer`
validates it (errors name the field and what it allows) and returns a callable. The reference answer is read from
the case's `reference_field` (`output`, as in the bundled JSONL). `wilson_interval` puts a 95% interval on an
accuracy.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

import jsonschema
from pydantic import ConfigDict, Field, field_validator, model_validator

from workloads.scoring import SCORERS, Complete, Scorer, ScorerError, ScorerSpec, register_scorer


def pick_label(prediction: str, labels: list[str], case_sensitive: bool = False) -> str | None:
    """The label the prediction names: the whole reply if it is one, else the last one mentioned as a word."""
    fold = (lambda s: s.strip()) if case_sensitive else (lambda s: s.strip().lower())
    text = prediction or ""
    for label in labels:
        if fold(text).rstrip(".!") == fold(label):
            return label
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    flags = 0 if case_sensitive else re.IGNORECASE
    found = list(re.finditer(rf"(?<!\w)(?:{alternatives})(?!\w)", text, flags))
    return next(label for label in labels if fold(label) == fold(found[-1].group())) if found else None


def parse_json_reply(prediction: str) -> Any:
    """The JSON value in a reply: the whole text, a ```json fenced block, or the outermost {...} / [...] span."""
    text = (prediction or "").strip()
    fenced = re.search(r"```(?:json)?\s*\n?(.*?)```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    for open_, close in ("{}", "[]"):
        if (start := text.find(open_)) >= 0 and (end := text.rfind(close)) > start:
            candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    raise ValueError("no JSON value in the reply")


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at z=1.96); (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


# ---------------------------------------------------------------------------------------------
# Scorer recipes: each config validates its fields and scores with `score(prediction, reference)`
# ---------------------------------------------------------------------------------------------


@register_scorer
class ContainsScorer(ScorerSpec):
    """1 when the prediction contains `value` (or, without one, the case's reference)."""

    type: Literal["contains"] = "contains"
    value: str | None = Field(None, min_length=1, description="Text to look for; null: the case's reference.")
    case_sensitive: bool = Field(False, description="Compare case as written (whitespace is always collapsed).")

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        return self.score(prediction, None if self.value is not None else self._reference(case))

    def score(self, prediction: str, reference: Any) -> float:
        needle = self.value if self.value is not None else str(reference)
        fold = (lambda s: " ".join(s.split())) if self.case_sensitive else (lambda s: " ".join(s.lower().split()))
        return float(fold(needle) in fold(prediction or ""))


@register_scorer
class RegexScorer(ScorerSpec):
    """1 when `pattern` matches somewhere in the prediction (the whole of it with `fullmatch`)."""

    type: Literal["regex"] = "regex"
    pattern: str = Field(..., min_length=1, description="A Python regular expression.")
    ignore_case: bool = Field(False, description="Match case-insensitively.")
    fullmatch: bool = Field(False, description="The pattern must match the whole (stripped) prediction.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        return self.score(prediction, None)  # no reference needed

    def score(self, prediction: str, reference: Any) -> float:
        flags = re.IGNORECASE if self.ignore_case else 0
        text = (prediction or "").strip()
        found = re.fullmatch(self.pattern, text, flags) if self.fullmatch else re.search(self.pattern, text, flags)
        return float(found is not None)


@register_scorer
class ChoiceScorer(ScorerSpec):
    """1 when the label picked from the prediction (`pick_label`) is the case's reference label."""

    type: Literal["choice"] = "choice"
    labels: list[str] = Field(..., min_length=2, description="The allowed labels, e.g. [positive, negative].")
    case_sensitive: bool = Field(False, description="Labels differ by case.")

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if any(not label.strip() for label in value) or len({v.lower() for v in value}) < len(value):
            raise ValueError("labels must be non-empty and distinct (ignoring case)")
        return value

    def score(self, prediction: str, reference: Any) -> float:
        reference = str(reference)
        expected = pick_label(reference, self.labels, self.case_sensitive)
        if expected is None:
            raise ScorerError(f"scorer choice: the case's {self.reference_field!r} is {reference!r}, not one of "
                              f"the labels {self.labels}")
        return float(pick_label(prediction, self.labels, self.case_sensitive) == expected)


@register_scorer
class JsonSchemaScorer(ScorerSpec):
    """1 when the prediction holds JSON (`parse_json_reply`) that is valid against `schema`."""

    type: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any] = Field(..., alias="schema", description="A JSON Schema (any draft jsonschema reads).")

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        return self.score(prediction, None)  # no reference needed

    def score(self, prediction: str, reference: Any) -> float:
        try:
            value = parse_json_reply(prediction)
        except ValueError:
            return 0.0
        return float(jsonschema.validators.validator_for(self.json_schema)(self.json_schema).is_valid(value))


@register_scorer
class JsonMatchScorer(ScorerSpec):
    """1 when the prediction holds JSON (`parse_json_reply`) equal to the reference's (a JSON text or a value):
    strict extraction, every field and type right, nothing extra."""

    type: Literal["json_match"] = "json_match"

    def score(self, prediction: str, reference: Any) -> float:
        expected = reference
        try:
            expected = json.loads(expected) if isinstance(expected, str) else expected
        except ValueError:
            raise ScorerError(f"scorer json_match: reference {expected!r} is not JSON") from None
        try:
            return float(parse_json_reply(prediction) == expected)
        except ValueError:
            return 0.0


_JUDGE_SYSTEM = "You grade answers strictly against a rubric. Reply with a line 'Score: N' and nothing after it."


@register_scorer
class JudgeScorer(ScorerSpec):
    """An LLM judge: the rubric, question, reference and prediction go to `complete`; its `Score: N` is scaled."""

    type: Literal["judge"] = "judge"
    rubric: str = Field(..., min_length=1, description="What a good answer is, in words the judge reads.")
    min_score: float = Field(0, description="Lowest score the judge may give (maps to 0).")
    max_score: float = Field(10, description="Highest score the judge may give (maps to 1).")
    input_fields: list[str] = Field(
        ["instruction", "input"], description="Case fields shown to the judge as the question (those present)."
    )

    @model_validator(mode="after")
    def _scale(self) -> JudgeScorer:
        if self.max_score <= self.min_score:
            raise ValueError(f"max_score ({self.max_score}) must be above min_score ({self.min_score})")
        return self

    def messages(self, prediction: str, case: Mapping[str, Any]) -> list[dict[str, str]]:
        """The judge's prompt for one case."""
        question = "\n\n".join(str(case[f]) for f in self.input_fields if case.get(f) not in (None, ""))
        reference = case.get(self.reference_field)
        parts = [f"Rubric:\n{self.rubric}", f"Question:\n{question or '(none)'}"]
        if reference not in (None, ""):
            parts.append(f"Reference answer:\n{reference}")
        parts += [f"Answer to grade:\n{prediction}",
                  f"Give a score from {self.min_score:g} to {self.max_score:g}. End with 'Score: N'."]
        return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]

    def parse(self, reply: str) -> float | None:
        """The judge's score scaled to [0, 1], or None when the reply has none in range."""
        found = re.findall(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)", reply or "", re.IGNORECASE)
        bare = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*\.?\s*", reply or "")
        raw = float(found[-1]) if found else float(bare.group(1)) if bare else None
        if raw is None or not self.min_score <= raw <= self.max_score:
            return None
        return (raw - self.min_score) / (self.max_score - self.min_score)

    def bind(self, complete: Complete | None) -> Scorer:
        """The judge asking through `complete`."""
        if complete is None:
            raise ScorerError("scorer judge: needs a `complete(messages) -> str` callable (the judge endpoint)")
        return BoundJudge(self, complete)


class BoundJudge:
    """A judge scorer bound to a `complete` callable; counts its calls and the replies it could not parse."""

    def __init__(self, config: JudgeScorer, complete: Complete) -> None:
        self.config, self.complete = config, complete
        self.name = config.name
        self.calls = self.unparseable = 0
        self._lock = threading.Lock()

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        score = self.config.parse(self.complete(self.config.messages(prediction, case)))
        with self._lock:
            self.calls += 1
            self.unparseable += int(score is None)
        return 0.0 if score is None else score


ScorerConfig = Annotated[
    Union[tuple(dict.fromkeys(SCORERS.values()))],  # noqa: UP007  (every registered scorer, exact and numeric too)
    Field(discriminator="type"),
]  # for recipe schemas that embed a scorer
