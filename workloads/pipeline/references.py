"""References to earlier stages' outputs in a stage's recipe: `${stages.NAME.outputs.KEY}` inside any string value
(a `--set` value or a field of an inline recipe), found, checked for shape and substituted."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

REFERENCE = re.compile(r"\$\{stages\.([A-Za-z0-9_.-]+?)\.outputs\.([A-Za-z0-9_]+)\}")
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}?")  # anything written like a reference, well-formed or not


@dataclass(frozen=True)
class Reference:
    """One reference: the field of the stage's recipe holding it (a path of keys and list indices), the stage and
    the output key it names, and its text."""

    field: tuple[str | int, ...]
    stage: str
    key: str
    text: str


def find(raw: Any, field: tuple[str | int, ...] = ()) -> Iterator[Reference]:
    """Every reference in a recipe mapping, with the field holding it; ValueError for a `${...}` of another shape."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            yield from find(value, (*field, key))
    elif isinstance(raw, list):
        for index, value in enumerate(raw):
            yield from find(value, (*field, index))
    elif isinstance(raw, str):
        for placeholder in _PLACEHOLDER.finditer(raw):
            match = REFERENCE.fullmatch(placeholder.group())
            if match is None:
                raise ValueError(f"{placeholder.group()!r} is not a reference: write ${{stages.NAME.outputs.KEY}}")
            yield Reference(field, match.group(1), match.group(2), match.group())


def substitute(raw: Any, outputs: dict[str, dict[str, Any]]) -> Any:
    """The recipe mapping with every reference replaced by the output it names (`outputs`: stage -> its outputs).
    A string that is exactly one reference takes the output's value as is (a number stays a number)."""
    if isinstance(raw, dict):
        return {key: substitute(value, outputs) for key, value in raw.items()}
    if isinstance(raw, list):
        return [substitute(value, outputs) for value in raw]
    if not isinstance(raw, str):
        return raw
    if whole := REFERENCE.fullmatch(raw):
        return outputs[whole.group(1)][whole.group(2)]
    return REFERENCE.sub(lambda m: str(outputs[m.group(1)][m.group(2)]), raw)
