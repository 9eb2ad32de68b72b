"""Reading the answer out of a reply: the one parser every scorer, vote and reward uses.

A reply's answer is, in order: the text after its last marker (`#### N` as in GSM8K, `Final Answer:`, `Answer:`,
`The answer is`), the last sentence starting with `Therefore`, else its last number. Numbers are read as written
in prose: a sign where no word or digit precedes it ("5-3" is 5 and 3, "x = -3" is -3), thousands commas
("1,200"), decimals ("3.5"), an exponent. A restating reply ("The sum of 49 and 97 is 146.") carries the operands
before the sum, so without a marker the sum is the final number.
"""

from __future__ import annotations

import re
import unicodedata

_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?<!\d)\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
_WHOLE_NUMBER = re.compile(r"(?P<sign>[-+]?)\$?(?P<digits>\d+(?:,\d{3})*(?:\.\d+)?|\d*\.\d+)%?")
_END = r"(?:\.(?:\s|$)|\n|$)"  # a sentence ends at a period before a space or the end, or at a line end
_MARKER = re.compile(
    rf"(?:#{{4}}|\b(?:final\s+)?answer\s*:|\bthe\s+(?:final\s+)?answer\s+is\s*:?)[ \t*]*(?P<answer>[^\n]*?){_END}",
    re.IGNORECASE,
)
_THEREFORE = re.compile(rf"\btherefore\b[,:]?\s*(?P<answer>[^\n]*?){_END}", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: what normalized exact match compares."""
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in (text or "").lower())
    return " ".join(text.split())


def last_number(text: str) -> float | None:
    """The last number written in `text` (sign, commas and decimals read), or None when it has none."""
    numbers = _NUMBER.findall(text or "")
    return float(numbers[-1].replace(",", "")) if numbers else None


def answer_text(text: str) -> str | None:
    """The answer a reply gives, as written: after its last marker, else its last `Therefore` sentence (its last
    number, or last word), else its last number; None when it has none of these."""
    text = text or ""
    markers = [m.group("answer") for m in _MARKER.finditer(text) if m.group("answer").strip()]
    if markers:
        return markers[-1]
    therefore = [m.group("answer") for m in _THEREFORE.finditer(text) if m.group("answer").strip()]
    if therefore:
        number = last_number(therefore[-1])
        if number is not None:
            return _number_text(number)
        words = re.findall(r"\w+", therefore[-1])
        return words[-1] if words else None
    number = last_number(text)
    return None if number is None else _number_text(number)


def final_number(text: str) -> float | None:
    """The number a reply answers with: the last number of its answer (`answer_text`), or None."""
    answer = answer_text(text)
    return None if answer is None else last_number(answer)


def canonical_answer(text: str) -> str | None:
    """The form answers are compared in: a number by value ("$1,000.0" -> "1000"), else normalized text."""
    text = text.strip().strip("*`\"' ").rstrip(".!")
    number = _WHOLE_NUMBER.fullmatch(text)
    if number:
        return _number_text(float(number.group("sign") + number.group("digits").replace(",", "")))
    return normalize_text(text) or None


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
