"""`llmc pipeline`: one driver runs the stages in order in this process, each through its kind's own runner as its
`llmc` command would (Kind.run: a nested MLflow run of the pipeline's when recording is on), skipping the stages whose
inputs are unchanged since their last run, and checking each stage's gates before the next starts.

Writes `<run dir>/<stage>/` per stage, `pipeline_state.json` (workloads.pipeline.state), the recipe and
summary.json: per stage, ran or skipped, its key, output directory and gate verdicts.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from workloads.common.recipe import RecipeError
from workloads.common.record import resolved_recipe
from workloads.common.reporting import save_recipe
from workloads.kinds import KINDS
from workloads.pipeline import gates, stages
from workloads.pipeline.outputs import stage_outputs
from workloads.pipeline.recipe import PipelineRecipe
from workloads.pipeline.state import STATE_FILE, PipelineState, forced_stages, stage_key


def check_start(recipe: PipelineRecipe, start_from: str | None, address: str | None = None) -> None:
    """`--from STAGE` must name a stage of the recipe, and a promote stage needs the cluster serving the endpoint
    (RecipeError, exit 2, before any work)."""
    if start_from is not None and start_from not in recipe.stage_names():
        raise RecipeError(f"field '--from': got {start_from!r}; stages: {', '.join(recipe.stage_names())}")
    for index, stage in enumerate(recipe.stages):
        raw = stages.mapping(stage)
        if raw.get("kind") == "promote" and not (raw.get("address") or address or os.environ.get("RAY_ADDRESS")):
            raise RecipeError(f"field 'stages.{index}.recipe.address': stage {stage.name!r} promotes on a running "
                              "endpoint: give its Ray cluster's address (the stage's address, `llmc pipeline "
                              "--address`, or RAY_ADDRESS)")


def run(recipe: PipelineRecipe, output_dir: str | Path | None = None, address: str | None = None,
        start_from: str | None = None) -> dict:
    """Run the stages in order; `start_from` forces that stage and every later one to run. Returns the summary
    (also written to summary.json); raises GateFailed after a stage that misses a gate."""
    check_start(recipe, start_from, address)
    out = recipe.output_dir(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out)
    state = PipelineState(out / STATE_FILE)
    outputs: dict[str, dict] = {}
    rows, forced = [], forced_stages(recipe.stage_names(), start_from)
    for stage in recipe.stages:
        stage_recipe = stages.load(stage, outputs)
        reads = [ref for _, ref in stages.found_references(stage)]
        key = stage_key(resolved_recipe(stage_recipe), reads, outputs)
        skipped = stage.name not in forced and state.unchanged(stage.name, key)
        if skipped:
            print(f"[llmc] {stage.name}: unchanged, skipped", flush=True)
            outputs[stage.name] = state.outputs(stage.name)
        else:
            print(f"[llmc] {stage.name}: running {stage_recipe.kind}", flush=True)
            outputs[stage.name] = _run_stage(stage_recipe, out / stage.name, address)
            state.finished(stage.name, key, outputs[stage.name])
        rows.append({"stage": stage.name, "kind": stage_recipe.kind, "status": "skipped" if skipped else "ran",
                     "key": key, "output_dir": str(out / stage.name)})
        _write_summary(out, rows)
        rows[-1]["gates"] = gates.check(stage.name, stage.gates, outputs[stage.name])
        if rows[-1]["gates"]:
            print(f"[llmc] {stage.name}: gates passed: {'; '.join(rows[-1]['gates'])}", flush=True)
    return _write_summary(out, rows)


def _run_stage(recipe, stage_dir: Path, address: str | None) -> dict:
    """Run one stage as its `llmc` command does, replacing what an earlier run of it left (its inputs changed)."""
    kind = KINDS[recipe.kind]
    options = {"overwrite": True} if "overwrite" in inspect.signature(kind.runner).parameters else {}
    summary = kind.run(recipe, output_dir=stage_dir, address=address, **options)
    return stage_outputs(str(stage_dir), json.loads(json.dumps(summary, default=str)))


def _write_summary(out: Path, rows: list[dict]) -> dict:
    summary = {"stages": rows, "ran": sum(r["status"] == "ran" for r in rows),
               "skipped": sum(r["status"] == "skipped" for r in rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
