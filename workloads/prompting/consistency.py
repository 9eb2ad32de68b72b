"""Self-consistency: pull an answer out of each of n sampled replies and take the majority vote.

Extraction is the recipe's regex (alone, when given), else `workloads.scoring.answers.answer_text` (the last `#### `,
`Final Answer:`, `Answer:` or `the answer is` marker; the last sentence starting with `Therefore`; the last
number). Answers are compared in a canonical form (`canonical_answer`: numbers by value, text lower-cased without
punctuation). A reply with no answer is unparseable: it votes for nothing but still counts in n, so the winner's
share is a conservative confidence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workloads.scoring.answers import answer_text, canonical_answer, last_number


class AnswerExtraction(BaseModel):
    """How answers are read from replies (a recipe's `extraction` block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str | None = Field(
        None, description="A regex used instead of the markers; the answer is its group `answer`, else group 1, else "
        "the whole match, of the last match."
    )
    numeric: bool = Field(False, description="Reduce every answer to its last number; one without a number is "
                                             "unparseable (for math tasks).")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


@dataclass(frozen=True)
class Vote:
    """The outcome of a majority vote over n samples."""

    answer: str | None  # the winner in canonical form; None when no sample had an answer
    confidence: float  # the winner's votes / n (unparseable samples included in n)
    counts: dict[str, int]  # answer -> votes, most votes first, ties in order of first appearance
    n: int
    unparseable: int
    tie: bool  # more than one answer had the top count; the first to appear won
    tied: tuple[str, ...]  # the answers that shared the top count (empty without a tie)
    answers: tuple[str | None, ...]  # each sample's canonical answer, in sample order


def extract_answer(text: str, extraction: AnswerExtraction | None = None) -> str | None:
    """The canonical answer in one reply, or None when it has none."""
    extraction = extraction or AnswerExtraction()
    text = text or ""
    if extraction.pattern is not None:
        matches = list(re.finditer(extraction.pattern, text))
        raw = _group(matches[-1]) if matches else None
    else:
        raw = answer_text(text)
    if raw is not None and extraction.numeric:
        number = last_number(raw)
        raw = None if number is None else str(number)
    return None if raw is None else canonical_answer(raw)


def _group(match: re.Match[str]) -> str:
    if "answer" in match.re.groupindex:
        return match.group("answer") or ""
    return (match.group(1) or "") if match.re.groups else match.group(0)


def vote(answers: Sequence[str | None]) -> Vote:
    """Majority vote over already-extracted answers (None: unparseable); ties go to the first to appear."""
    if not answers:
        raise ValueError("self-consistency needs at least one sample")
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    ranked = dict(sorted(counts.items(), key=lambda item: -item[1]))  # stable: first appearance breaks ties
    top = max(counts.values(), default=0)
    leaders = tuple(a for a, c in ranked.items() if c == top)
    winner = leaders[0] if leaders else None
    return Vote(
        answer=winner, confidence=top / len(answers), counts=ranked, n=len(answers),
        unparseable=sum(a is None for a in answers), tie=len(leaders) > 1,
        tied=leaders if len(leaders) > 1 else (), answers=tuple(answers),
    )


def majority_vote(samples: Sequence[str], extraction: AnswerExtraction | None = None) -> Vote:
    """Extract an answer from each sampled reply and vote; the result counts ties and unparseable samples."""
    return vote([extract_answer(sample, extraction) for sample in samples])
