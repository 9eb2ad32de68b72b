"""A stage's recipe: read (its file, or the inline mapping) with its `set` overrides, checked before the pipeline
runs (references shape-only, since what they name does not exist yet), and loaded for its run once the stages it
references have run.

Checks before any work, each naming its field: a reference to a stage that does not exist or does not come earlier
(stages run in order, so that is a cycle), to an output the named stage's kind does not write, a gate on a metric its
own kind does not write, a kind that cannot be a stage, and every field the stage's own schema refuses.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from workloads.common.recipe import RecipeError, apply_override, read_recipe
from workloads.kinds import KINDS, validate_recipe
from workloads.pipeline import references
from workloads.pipeline.outputs import OUTPUT_DIR, STAGE_KINDS, summary_keys
from workloads.pipeline.references import Reference

if TYPE_CHECKING:
    from workloads.common.recipe import StrictModel
    from workloads.pipeline.recipe import StageConfig

Field = tuple[str | int, ...]


def mapping(stage: StageConfig) -> dict[str, Any]:
    """The stage's recipe mapping: its file read (or the inline mapping copied), then its `set` overrides applied;
    references left in place. RecipeError when the file is missing or an override is malformed."""
    raw = read_recipe(stage.recipe) if isinstance(stage.recipe, str) else copy.deepcopy(stage.recipe)
    for item in stage.set:
        apply_override(raw, item)
    return raw


def found_references(stage: StageConfig) -> list[tuple[Field, Reference]]:
    """Every reference the stage makes, with the pipeline field it is written in (`set.J` or `recipe.PATH`)."""
    found: list[tuple[Field, Reference]] = []
    for index, item in enumerate(stage.set):
        written: dict[str, Any] = {}
        apply_override(written, item)
        found += [(("set", index), ref) for ref in references.find(written)]
    if isinstance(stage.recipe, dict):
        found += [(("recipe", *ref.field), ref) for ref in references.find(stage.recipe)]
    return found


def check(stages: list[StageConfig]) -> list[InitErrorDetails]:
    """Every error of the pipeline's stages, each at its field (`stages.I....`), before anything runs."""
    errors: list[InitErrorDetails] = []
    produced: dict[str, frozenset[str]] = {}  # stage -> the outputs it will have, for the stages before this one
    order = [stage.name for stage in stages]
    for index, stage in enumerate(stages):
        here: Field = ("stages", index)
        if stage.name in order[:index]:
            errors.append(_error((*here, "name"), stage.name, f"stage name {stage.name!r} is used twice"))
        try:
            raw, refs = mapping(stage), found_references(stage)
        except (RecipeError, ValueError) as exc:
            errors.append(_error((*here, "set" if stage.set else "recipe"), stage.recipe, str(exc)))
            continue
        kind = raw.get("kind", "finetune")
        if kind not in STAGE_KINDS:
            errors.append(_error((*here, "recipe"), kind, f"kind {kind!r} cannot be a stage (allowed: "
                                 f"{', '.join(STAGE_KINDS)}; serve runs until stopped, an eval stage starts its own "
                                 "server)"))
            continue
        errors += [_reference_error((*here, *where), ref, order, index, produced) for where, ref in refs]
        errors += _recipe_errors(raw, kind, refs, (*here, "recipe"), f"stage {stage.name!r}")
        keys = summary_keys(raw, KINDS[kind].schema) | {OUTPUT_DIR}
        errors += [_error((*here, "gates", g, "metric"), gate.metric,
                          f"stage {stage.name!r} ({kind}) writes no {gate.metric!r}; its summary has: "
                          f"{', '.join(sorted(keys))}")
                   for g, gate in enumerate(stage.gates) if gate.metric not in keys]
        produced[stage.name] = keys
    return [e for e in errors if e is not None]


def load(stage: StageConfig, outputs: dict[str, dict[str, Any]]) -> StrictModel:
    """The stage's recipe with every reference replaced by the output it names, validated as its kind's recipe."""
    return validate_recipe(references.substitute(mapping(stage), outputs), kind=STAGE_KINDS,
                           source=f"stage {stage.name!r}")


def _reference_error(field: Field, ref: Reference, order: list[str], index: int,
                     produced: dict[str, frozenset[str]]) -> InitErrorDetails | None:
    if ref.stage not in order:
        return _error(field, ref.text, f"names stage {ref.stage!r}, which does not exist (stages: {', '.join(order)})")
    if order.index(ref.stage) >= index:
        return _error(field, ref.text, f"names stage {ref.stage!r}, which does not run before stage {order[index]!r} "
                      "(stages run in order: a reference to this or a later stage is a cycle)")
    if ref.stage in produced and ref.key not in produced[ref.stage]:
        return _error(field, ref.text, f"stage {ref.stage!r} writes no output {ref.key!r}; it has: "
                      f"{', '.join(sorted(produced[ref.stage]))}")
    return None


def _recipe_errors(raw: dict, kind: str, refs: list[tuple[Field, Reference]], field: Field,
                   source: str) -> list[InitErrorDetails]:
    """The stage recipe's own errors, less those at (or above) a field that holds a reference not yet resolved."""
    try:
        KINDS[kind].schema.model_validate(raw)
    except ValidationError as exc:
        held = [ref.field for _, ref in refs]
        return [_error((*field, *err["loc"]), err.get("input"), f"{err['msg']} ({source})")
                for err in exc.errors()
                if not any(_covers(tuple(err["loc"]), f) for f in held)]
    return []


def _covers(loc: Field, held: Field) -> bool:
    """Whether an error at `loc` may come from the reference at `held`: the same field, inside it, or a section
    holding it."""
    n = min(len(loc), len(held))
    return bool(loc) and loc[:n] == held[:n]


def _error(loc: Field, value: Any, message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("pipeline", "{message}", {"message": message}), loc=loc,
                            input=value)
