"""Scoring replies against reference answers: for arithmetic, the last number in a reply is its answer.

A restating reply (`49 + 97 = 146`, "The sum of 49 and 97 is 146.") carries the operands before the sum, so
the sum is the final number; the demo, the tiny model's skill card and the tests all score that way.
`SCORERS` are the reply-vs-reference checks a fine-tuning recipe's `eval.scorer` names.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\d+")


def final_number(text: str) -> int | None:
    """The last non-negative integer in `text`, or None when it has none."""
    numbers = _NUMBER.findall(text or "")
    return int(numbers[-1]) if numbers else None


def exact_match(reply: str, reference: str) -> bool:
    """The reply is the reference, whitespace around either aside."""
    return (reply or "").strip() == (reference or "").strip()


def final_number_match(reply: str, reference: str) -> bool:
    """The reply's last integer is the reference's (a reference without one matches nothing)."""
    expected = final_number(reference)
    return expected is not None and final_number(reply) == expected


SCORERS = {"exact": exact_match, "final_number": final_number_match}  # the names `eval.scorer` allows
