"""The scorer registry: one table of reply-vs-reference checks, looked up by name by fine-tuning evaluation
(`eval.scorer`), prompt evaluation (a recipe's `scorers`) and RL rewards (`exact_answer`).

Each scorer is a pydantic config whose `type` names it; `@register_scorer` puts it in `SCORERS` where it is
defined (exact and numeric here, the prompt-evaluation ones in `workloads.prompting.scorers`). `build_scorer`
validates a recipe mapping such as `{type: numeric, tolerance: 0.01}` (errors name the field and what it allows).
A built scorer scores `score(prediction, reference)`, or `scorer(prediction, case)` reading the reference from the
case's `reference_field`. Answers are read by `workloads.scoring.answers`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workloads.common.recipe import format_errors
from workloads.scoring.answers import final_number, normalize_text

Complete = Callable[[list[dict[str, str]]], str]  # chat messages in, the reply's text out
Scorer = Callable[[str, Mapping[str, Any]], float]  # (prediction, case) -> score in [0, 1]


class ScorerError(ValueError):
    """A scorer recipe that cannot be built, or a case it cannot score; the message names the field."""


class ScorerSpec(BaseModel):
    """A scorer's recipe fields; `score(prediction, reference)` is the check, calling it with a case reads the
    reference from `reference_field`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    reference_field: str = Field("output", min_length=1, description="The case field holding the reference answer.")

    @property
    def name(self) -> str:
        return self.type

    def score(self, prediction: str, reference: Any) -> float:
        """The prediction's score in [0, 1] against `reference`."""
        raise ScorerError(f"scorer {self.name}: scores whole cases (call it with the case), not a bare reference")

    def bind(self, complete: Complete | None) -> Scorer:
        """The callable scorer; a scorer that asks a model (a judge) binds `complete` here."""
        return self

    def __call__(self, prediction: str, case: Mapping[str, Any]) -> float:
        return self.score(prediction, self._reference(case))

    def _reference(self, case: Mapping[str, Any]) -> Any:
        if self.reference_field not in case:
            raise ScorerError(f"scorer {self.name}: the case has no field {self.reference_field!r} "
                              f"(reference_field); its fields: {', '.join(sorted(case))}")
        return case[self.reference_field]


SCORERS: dict[str, type[ScorerSpec]] = {}  # scorer name (`type`) -> its config class, filled by @register_scorer


def register_scorer(cls: type[ScorerSpec]) -> type[ScorerSpec]:
    """Class decorator: add the scorer under each name its `type` Literal allows (a name is registered once)."""
    for name in typing.get_args(cls.model_fields["type"].annotation):
        if name in SCORERS and SCORERS[name] is not cls:
            raise ValueError(f"scorer {name!r} is registered twice ({SCORERS[name].__name__}, {cls.__name__})")
        SCORERS[name] = cls
    return cls


def build_scorer(spec: Mapping[str, Any] | ScorerSpec, complete: Complete | None = None) -> Scorer:
    """A scorer from its recipe mapping (`{type: ..., ...}`) or config, looked up in `SCORERS`; a judge also needs
    `complete`."""
    if isinstance(spec, ScorerSpec):  # a config a recipe schema validated: built anew from the table too
        spec = spec.model_dump(by_alias=True)
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind not in SCORERS:
        raise ScorerError(f"scorer: field 'type': got {kind!r}; allowed: {', '.join(sorted(SCORERS))}")
    try:
        config = SCORERS[kind].model_validate(dict(spec))
    except ValidationError as exc:
        fields = ", ".join(info.alias or name for name, info in SCORERS[kind].model_fields.items())
        raise ScorerError(f"{format_errors(exc, f'scorer {kind}')}\n  fields of scorer {kind}: {fields}") from None
    return config.bind(complete)


@register_scorer
class ExactScorer(ScorerSpec):
    """1 when the prediction equals the reference after `normalize_text` (case, punctuation and spacing aside)."""

    type: Literal["exact"] = "exact"

    def score(self, prediction: str, reference: Any) -> float:
        return float(normalize_text(prediction) == normalize_text(str(reference)))


@register_scorer
class NumericScorer(ScorerSpec):
    """1 when the prediction's answer number (`final_number`: after `#### `, `Answer:`, `The answer is`, else its
    last number) is within `tolerance` of the reference's (read the same way when it is text). A reference without
    a number matches nothing. `final_number` is this scorer under the name fine-tuning recipes use."""

    type: Literal["numeric", "final_number"] = "numeric"
    tolerance: float = Field(0.0, ge=0, description="Largest accepted difference (absolute, or relative).")
    relative: bool = Field(False, description="tolerance is a fraction of |reference| instead of absolute.")

    def score(self, prediction: str, reference: Any) -> float:
        expected = float(reference) if isinstance(reference, int | float) else final_number(str(reference))
        got = final_number(prediction)
        if expected is None or got is None:
            return 0.0
        allowed = self.tolerance * abs(expected) if self.relative else self.tolerance
        return float(abs(got - expected) <= allowed + 1e-12 * max(1.0, abs(expected)))
