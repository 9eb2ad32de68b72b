"""The recipe kinds: one table of kind -> schema -> runner that `llmc`, `llmc validate` and `load_recipe` read.

A row names its schema, its runner and its plan as `module:attribute`, imported only when that kind is used, so a
bad recipe fails before torch or Ray is imported. Adding a kind is adding a row (and its `llmc` command in
workloads.cli). `kinds()` lists every kind with its schema class (for a documentation generator).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workloads.common.recipe import RecipeError, StrictModel, format_errors, read_recipe


@dataclass(frozen=True)
class Kind:
    """One recipe kind: the `llmc` command that runs it, its schema, its runner and what `llmc validate` adds."""

    name: str
    command: str  # the `llmc` command that runs a recipe of this kind
    schema_path: str  # module:Class, a StrictModel whose `kind` field is `name`
    runner_path: str  # module:function, run(recipe, ...) as the command calls it
    plan_path: str | None = None  # module:function(recipe) -> dict that `llmc validate` prints; None: nothing more

    @property
    def schema(self) -> type[StrictModel]:
        """The recipe schema of this kind (its module imported now)."""
        return _resolve(self.schema_path)

    @property
    def runner(self) -> Callable[..., Any]:
        """The function that runs a validated recipe of this kind (its module, and torch or Ray, imported now)."""
        return _resolve(self.runner_path)

    def run(self, recipe: StrictModel, output_dir: str | Path | None = None, **options: Any) -> dict:
        """Run a recipe of this kind as `llmc` does: the runner, its results recorded as an MLflow run
        (workloads.common.record) opened before any work. `options` go to the runner (address, overwrite, ...)."""
        from workloads.common import record

        register_as = getattr(getattr(recipe, "run", None), "register_as", None)
        if register_as and not record.enabled():
            raise RecipeError(f"field 'run.register_as': registering {register_as!r} needs the MLflow record, which "
                              f"{record.SWITCH_ENV}=off turns off")
        with record.recording(self.name, recipe, recipe.output_dir(output_dir)) as run:
            summary = self.runner(recipe, output_dir=output_dir, **options)
            if run is not None:
                run.finish(summary)
                if register_as:
                    summary = _registered(run, register_as, summary)
        return summary

    def plan(self, recipe: StrictModel) -> dict:
        """What `llmc validate` prints beyond the recipe being valid: resources, batch math, data rows."""
        return _resolve(self.plan_path)(recipe) if self.plan_path else {}


# kind, the llmc command that runs it, schema, runner, and what `llmc validate` adds (None: nothing).
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("finetune", "finetune", "workloads.finetune.recipe:FinetuneRecipe", "workloads.finetune.driver:run",
         "workloads.finetune.plan:validation_plan"),
    Kind("align", "align", "workloads.align.recipe:AlignRecipe", "workloads.align.run:run",
         "workloads.align.plan:align_plan"),
    Kind("serve", "serve", "workloads.serve.recipe:ServeRecipe", "workloads.serve.deploy:run",
         "workloads.serve.plan:serve_plan"),
    Kind("eval", "eval", "workloads.prompting.recipe:EvalRecipe", "workloads.prompting.harness:run"),
    Kind("optimize", "optimize", "workloads.prompting.recipe:OptimizeRecipe", "workloads.prompting.optimizer:run"),
    Kind("prompt_search", "search", "workloads.prompting.recipe:PromptSearchRecipe", "workloads.search.prompts:run"),
    Kind("hparam_search", "search", "workloads.search.recipe:HparamSearchRecipe", "workloads.search.hparams:run",
         "workloads.search.recipe:HparamSearchRecipe.plan"),
    Kind("promote", "promote", "workloads.serve.recipe:PromoteRecipe", "workloads.serve.promote:run"),
    Kind("pipeline", "pipeline", "workloads.pipeline.recipe:PipelineRecipe", "workloads.pipeline.run:run",
         "workloads.pipeline.recipe:PipelineRecipe.plan"),
)}


def kinds() -> list[tuple[str, type[StrictModel]]]:
    """Every recipe kind with its schema class, in table order: what a documentation generator lists."""
    return [(name, kind.schema) for name, kind in KINDS.items()]


def load_recipe(path: str | Path, overrides: list[str] | None = None, kind: str | tuple[str, ...] | None = None) -> Any:
    """Read, override and validate a recipe; raises RecipeError naming every bad field."""
    return validate_recipe(read_recipe(path, overrides), kind=kind, source=str(path))


def validate_recipe(raw: dict, kind: str | tuple[str, ...] | None = None, source: str = "recipe") -> Any:
    """Validate a recipe mapping against the schema its `kind` names, which must be the one (or one of those) asked
    for; a recipe that names no kind is the first asked for, else finetune."""
    asked = (kind,) if isinstance(kind, str) else tuple(kind or ())
    kind = raw.get("kind", asked[0] if asked else "finetune")
    if (asked and kind not in asked) or kind not in KINDS:
        allowed = ", ".join(asked or sorted(KINDS))
        raise RecipeError(f"{source}: field 'kind': got {kind!r}; allowed: {allowed}")
    try:
        return KINDS[kind].schema.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, source)) from None


def _registered(run: Any, name: str, summary: dict) -> dict:
    """The summary with the version its artifact was registered as (`registered_version`), in summary.json too."""
    import json

    from workloads.common import registry

    summary = {**summary, "registered_version": registry.register_output(run, name, summary)}
    print(f"[llmc] registered {summary['registered_version']} (alias candidate)", flush=True)
    written = run.out / "summary.json"
    if written.exists():
        written.write_text(json.dumps({**json.loads(written.read_text()), **summary}, indent=2, default=str))
        run.run.client.log_artifact(run.run_id, str(written))  # the copy logged before it was registered, replaced
    return summary


def _resolve(path: str) -> Any:
    """The object a `module:attribute.attribute` path names, its module imported now."""
    module, _, attributes = path.partition(":")
    found: Any = importlib.import_module(module)
    for attribute in attributes.split("."):
        found = getattr(found, attribute)
    return found
