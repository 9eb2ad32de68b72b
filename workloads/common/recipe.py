"""What every recipe is made of: `StrictModel` blocks, `RecipeError`, reading a recipe file with `--set` overrides,
and writing the resolved recipe beside a run.

The recipe kinds and their schemas are listed in `workloads.kinds`, whose `load_recipe` validates what `read_recipe`
reads. This module imports neither torch nor Ray, so validation runs before any cluster or model work.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from workloads.common.paths import resolve_path


class RecipeError(ValueError):
    """A recipe that cannot run; the message names each bad field and what it allows."""


# Run, model and adapter names: safe in paths and URLs; at least one character is not a dot (no . or ..).
NAME_PATTERN = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"


class StrictModel(BaseModel):
    """A recipe block: unknown fields are errors (a typo never passes silently); assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a recipe file and apply `--set` overrides; raises RecipeError when it is missing or not a mapping."""
    resolved = resolve_path(str(path))
    if resolved is None:
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(resolved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of fields, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def format_errors(exc: ValidationError, source: str) -> str:
    """One line per bad field: its dotted path, the value given and what is allowed."""
    lines = [f"{source}: {exc.error_count()} invalid field(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and its section)"
        got = "" if err["type"] == "missing" else f" got {err.get('input')!r};"
        lines.append(f"  field '{loc}':{got} {msg}")
    return "\n".join(lines)


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def dump_recipe(recipe: BaseModel, path: Path) -> None:
    """Write the resolved recipe (every default filled in) beside a run's outputs."""
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
