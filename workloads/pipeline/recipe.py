"""Recipe schema of `kind: pipeline` (`llmc pipeline`): stages, each an existing recipe (a file with `--set`-style
overrides, or an inline mapping) that may read earlier stages' outputs, and gates on a stage's summary numbers.

The whole pipeline is checked here, before any stage runs: each stage's recipe through its own kind's schema, and
every reference and gate against what the stages it names will write (workloads.pipeline.stages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from workloads.common.recipe import NAME_PATTERN, StrictModel


class GateConfig(StrictModel):
    """A bar a stage's result must clear, or the pipeline stops (exit 1) after that stage."""

    metric: str = Field(..., min_length=1, description="A key of the stage's summary (summary.json), e.g. "
                        "final_eval_loss, best_accuracy, final_mean_reward.")
    min: float | None = Field(None, description="The metric must be at least this.")
    max: float | None = Field(None, description="The metric must be at most this.")

    @model_validator(mode="after")
    def _has_a_bar(self) -> GateConfig:
        if self.min is None and self.max is None:
            raise ValueError(f"gate on {self.metric!r}: give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate on {self.metric!r}: min {self.min} is above max {self.max}")
        return self


class StageConfig(StrictModel):
    """One step of the pipeline: a recipe of any kind but serve and pipeline, run as its `llmc` command runs it."""

    name: str = Field(..., pattern=NAME_PATTERN, description="The stage's name: its output directory under the "
                      "pipeline's, its MLflow run, and what later stages' references name.")
    recipe: str | dict[str, Any] = Field(..., description="A recipe file (e.g. workloads/configs/tiny-lora.yaml) or "
                                         "an inline recipe mapping (with its `kind`).")
    set: list[str] = Field(default_factory=list, description="`--set`-style KEY=VALUE overrides of the recipe; a value "
                           "may be or hold ${stages.NAME.outputs.KEY}: an earlier stage's output (its summary's "
                           "entries, e.g. artifact, and output_dir).")
    gates: list[GateConfig] = Field(default_factory=list, description="Bars on this stage's summary, checked after "
                                    "it runs (or from its stored summary when it is skipped).")


class PipelineRecipe(StrictModel):
    kind: Literal["pipeline"] = "pipeline"
    name: str = Field(..., pattern=NAME_PATTERN, description="The pipeline's name: runs/NAME by default.")
    stages: list[StageConfig] = Field(..., min_length=1, description="Run in this order; a stage whose inputs "
                                      "(resolved recipe, data digests, referenced upstream outputs) are unchanged "
                                      "since its last run is skipped.")

    def output_dir(self, given: str | Path | None = None) -> Path:
        """Where the pipeline writes (a directory per stage, pipeline_state.json): `given`, else runs/NAME."""
        return Path(given or f"runs/{self.name}")

    def stage_names(self) -> list[str]:
        """The stages, in the order they run."""
        return [stage.name for stage in self.stages]

    def plan(self) -> dict:
        """What `llmc validate` adds: each stage's kind, the stages it reads from and its gates."""
        from workloads.pipeline import stages

        return {"stages": [{"name": s.name, "kind": stages.mapping(s).get("kind", "finetune"),
                            "reads": sorted({ref.stage for _, ref in stages.found_references(s)}),
                            "gates": [g.model_dump(exclude_none=True) for g in s.gates]} for s in self.stages]}

    @model_validator(mode="after")
    def _stages_fit_together(self) -> PipelineRecipe:
        from workloads.pipeline import stages  # it reads the table of kinds, which names this schema

        if errors := stages.check(self.stages):
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self
