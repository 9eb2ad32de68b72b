"""Scoring arithmetic answers: the last number in a reply is its answer.

A restating reply (`49 + 97 = 146`, "The sum of 49 and 97 is 146.") carries the operands before the sum, so
the sum is the final number; the demo, the tiny model's skill card and the tests all score that way.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\d+")


def final_number(text: str) -> int | None:
    """The last non-negative integer in `text`, or None when it has none."""
    numbers = _NUMBER.findall(text or "")
    return int(numbers[-1]) if numbers else None
