"""Scorers for the evaluation harness: each maps (prediction, case) to a float in [0, 1].

A recipe names a scorer as a mapping such as `{type: numeric, tolerance: 0.01}`; `build_scorer` validates it
(errors name the field and what it allows) and returns a callable. The reference answer is read from the case's
`reference_field` (`output`, as in the bundled JSONL). `wilson_interval` puts a 95% interval on an accuracy.
"""

from __future__ import annotations

import json
import math
import re
import threading
import unicodedata
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workloads.config import format_errors

Complete = Callable[[list[dict[str, str]]], str]  # chat messages in, the reply's text out
# A number as written in prose: a sign only where no word precedes it ("5-3" is 5 and 3, "x = -3" is -3),
# thousands commas, decimals, an exponent.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?<!\d)\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


class ScorerError(ValueError):
    """A scorer recipe that cannot be built, or a case it cannot score; the message names the field."""


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: what normalized exact match compares."""
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in (text or "").lower())
    return " ".join(text.split())


def last_number(text: str) -> float | None:
    """The last number written in `text` (sign, commas and decimals read), or None when it has none."""
    numbers = _NUMBER.findall(text or "")
    return float(numbers[-1].replace(",", "")) if numbers else None


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
# Scorer recipes: each config validates its fields and scores with `__call__`
# ---------------------------------------------------------------------------------------------


class _Scorer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    reference_field: str = Field("output", min_length=1, description="The case field holding the reference answer.")

    @property
    def name(self) -> str:
        return self.type

    def _reference(self, case: Mapping[str, Any]) -> Any:
        if self.reference_field not in case:
            raise ScorerError(f"scorer {self.name}: the case has no field {self.reference_field!r} "
                              f"(reference_field); its fields: {', '.join(sorted(case))}")
        return case[self.reference_field]


class ExactScorer(_Scorer):
    """1 when the prediction equals the reference after `normalize_text`."""

    type: Literal["exact"] = "exact"

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        return float(normalize_text(prediction) == normalize_text(str(self._reference(case))))


class ContainsScorer(_Scorer):
    """1 when the prediction contains `value` (or, without one, the case's reference)."""

    type: Literal["contains"] = "contains"
    value: str | None = Field(None, min_length=1, description="Text to look for; null: the case's reference.")
    case_sensitive: bool = Field(False, description="Compare case as written (whitespace is always collapsed).")

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        needle = self.value if self.value is not None else str(self._reference(case))
        fold = (lambda s: " ".join(s.split())) if self.case_sensitive else (lambda s: " ".join(s.lower().split()))
        return float(fold(needle) in fold(prediction or ""))


class RegexScorer(_Scorer):
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
        flags = re.IGNORECASE if self.ignore_case else 0
        text = (prediction or "").strip()
        found = re.fullmatch(self.pattern, text, flags) if self.fullmatch else re.search(self.pattern, text, flags)
        return float(found is not None)


class NumericScorer(_Scorer):
    """1 when the prediction's last number is within `tolerance` of the reference (its last number, if text)."""

    type: Literal["numeric"] = "numeric"
    tolerance: float = Field(0.0, ge=0, description="Largest accepted difference (absolute, or relative).")
    relative: bool = Field(False, description="tolerance is a fraction of |reference| instead of absolute.")

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        reference = self._reference(case)
        expected = float(reference) if isinstance(reference, int | float) else last_number(str(reference))
        if expected is None:
            raise ScorerError(f"scorer numeric: the case's {self.reference_field!r} has no number: {reference!r}")
        got = last_number(prediction)
        if got is None:
            return 0.0
        allowed = self.tolerance * abs(expected) if self.relative else self.tolerance
        return float(abs(got - expected) <= allowed + 1e-12 * max(1.0, abs(expected)))


class ChoiceScorer(_Scorer):
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

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        reference = str(self._reference(case))
        expected = pick_label(reference, self.labels, self.case_sensitive)
        if expected is None:
            raise ScorerError(f"scorer choice: the case's {self.reference_field!r} is {reference!r}, not one of "
                              f"the labels {self.labels}")
        return float(pick_label(prediction, self.labels, self.case_sensitive) == expected)


class JsonSchemaScorer(_Scorer):
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
        try:
            value = parse_json_reply(prediction)
        except ValueError:
            return 0.0
        return float(jsonschema.validators.validator_for(self.json_schema)(self.json_schema).is_valid(value))


class JsonMatchScorer(_Scorer):
    """1 when the prediction holds JSON (`parse_json_reply`) equal to the reference's (a JSON text or a value):
    strict extraction, every field and type right, nothing extra."""

    type: Literal["json_match"] = "json_match"

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        expected = self._reference(case)
        try:
            expected = json.loads(expected) if isinstance(expected, str) else expected
        except ValueError:
            raise ScorerError(f"scorer json_match: reference {expected!r} is not JSON") from None
        try:
            return float(parse_json_reply(prediction) == expected)
        except ValueError:
            return 0.0


_JUDGE_SYSTEM = "You grade answers strictly against a rubric. Reply with a line 'Score: N' and nothing after it."


class JudgeScorer(_Scorer):
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
    ExactScorer | ContainsScorer | RegexScorer | NumericScorer | ChoiceScorer | JsonSchemaScorer | JsonMatchScorer
    | JudgeScorer,
    Field(discriminator="type"),
]  # for recipe schemas that embed a scorer
SCORER_TYPES: dict[str, type[_Scorer]] = {
    cls.model_fields["type"].default: cls
    for cls in (ExactScorer, ContainsScorer, RegexScorer, NumericScorer, ChoiceScorer, JsonSchemaScorer,
                JsonMatchScorer, JudgeScorer)
}
Scorer = Callable[[str, Mapping[str, Any]], float]


def build_scorer(spec: Mapping[str, Any] | _Scorer, complete: Complete | None = None) -> Scorer:
    """A scorer from its recipe mapping (`{type: ..., ...}`); a judge also needs `complete`."""
    if isinstance(spec, _Scorer):
        config = spec
    else:
        kind = spec.get("type") if isinstance(spec, Mapping) else None
        if kind not in SCORER_TYPES:
            raise ScorerError(f"scorer: field 'type': got {kind!r}; allowed: {', '.join(sorted(SCORER_TYPES))}")
        try:
            config = SCORER_TYPES[kind].model_validate(dict(spec))
        except ValidationError as exc:
            fields = ", ".join(info.alias or name for name, info in SCORER_TYPES[kind].model_fields.items())
            raise ScorerError(f"{format_errors(exc, f'scorer {kind}')}\n  fields of scorer {kind}: {fields}") from None
    if isinstance(config, JudgeScorer):
        if complete is None:
            raise ScorerError("scorer judge: needs a `complete(messages) -> str` callable (the judge endpoint)")
        return BoundJudge(config, complete)
    return config
