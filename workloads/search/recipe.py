"""The hyperparameter-search recipe (kind: hparam_search): a fine-tuning recipe, the space of values to try and the
ASHA settings; `plan` is what `llmc validate` prints."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from workloads.common.paths import resolve_path
from workloads.common.recipe import RecipeError, StrictModel, format_errors
from workloads.finetune.recipe import EVAL_METRIC_MODES, FinetuneRecipe
from workloads.kinds import load_recipe

# Space field -> (recipe section, field) of the fine-tuning recipe it sets.
SPACE_FIELDS = {"learning_rate": ("train", "learning_rate"), "lora_r": ("lora", "r"),
                "lora_alpha": ("lora", "alpha"), "max_steps": ("train", "max_steps")}


_SHORT = {"learning_rate": "lr", "lora_r": "r", "lora_alpha": "alpha", "max_steps": "steps"}


class HparamSpace(StrictModel):
    """The grid searched: every combination of these values; a field left null keeps the fine-tuning recipe's."""

    learning_rate: list[Annotated[float, Field(gt=0, le=1.0)]] | None = Field(
        None, min_length=1, description="Peak learning rates (train.learning_rate).")
    lora_r: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1, description="LoRA ranks (lora.r).")
    lora_alpha: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="LoRA alphas (lora.alpha); the adapter's scale is alpha / r.")
    max_steps: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="Run lengths in optimizer steps (train.max_steps; replaces num_epochs).")


class HparamSearchSettings(StrictModel):
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop trials whose metric trails at a rung.")
    grace_period: int | None = Field(
        None, ge=1, description="Training steps every trial runs before ASHA may stop it; at least the fine-tuning "
        "recipe's train.eval_every (a trial is judged on an evaluation); null: train.eval_every.")
    reduction_factor: float = Field(2, gt=1, description="ASHA keeps the top 1/reduction_factor at each rung.")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; null: as many as the cluster holds side by side, each holding its "
        "driver's CPUs plus the fine-tuning recipe's scaling.num_workers x resources per worker.")
    driver_cpus: float = Field(0.5, gt=0, description="Logical CPUs of each trial's driver (the Tune trial that "
                                                      "starts and watches its Ray Train run; it computes nothing).")


@dataclass(frozen=True)
class Trial:
    """One point of the grid: its name (also its Ray Train run's), label, values and the recipe it runs."""

    name: str
    label: str
    hparams: dict[str, Any]
    recipe: FinetuneRecipe


class HparamSearchRecipe(StrictModel):
    kind: Literal["hparam_search"] = "hparam_search"
    name: str = Field("hparam-search", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="The Tune experiment's name; its trials (and their Ray Train runs) are NAME-00, ...")
    overrides: list[str] = Field(
        default_factory=list, description="`--set`-style KEY=VALUE changes to the fine-tuning recipe for every trial, "
        "e.g. scaling.num_workers=1.")
    finetune: str = Field(..., description="The fine-tuning recipe (kind finetune) every trial runs, as a path.")
    space: HparamSpace
    metric: Literal["eval_loss", "eval_perplexity", "eval_exact_match"] = Field(
        "eval_loss", description="What ASHA and the pick of the best trial follow: lower is better for eval_loss and "
        "eval_perplexity, higher for eval_exact_match (needs eval.generate in the fine-tuning recipe).")
    search: HparamSearchSettings = Field(default_factory=HparamSearchSettings)

    def output_dir(self, given: str | Path | None = None) -> Path:
        """Where the search writes its results: `given` (--output-dir), else runs/NAME; absolute."""
        return Path(given or f"runs/{self.name}").resolve()

    @field_validator("finetune")
    @classmethod
    def _finetune_recipe(cls, value: str, info: ValidationInfo) -> str:
        if resolve_path(value) is None:
            raise ValueError(f"file not found (looked in {Path.cwd()} and the repository)")
        try:
            load_recipe(value, info.data.get("overrides"), kind="finetune")
        except RecipeError as exc:
            raise ValueError(f"the fine-tuning recipe (with `overrides`) is invalid:\n{exc}") from None
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> HparamSearchRecipe:
        base = self.base()
        if base.train.method == "full" and (self.space.lora_r or self.space.lora_alpha):
            raise ValueError("space.lora_r and space.lora_alpha need a LoRA method: the fine-tuning recipe trains "
                             "method full")
        if self.metric == "eval_exact_match" and not base.eval.generate:
            raise ValueError("metric eval_exact_match is measured only with eval.generate: true in the fine-tuning "
                             "recipe (add it to overrides)")
        if not (base.data.eval_fraction > 0 or any(source.eval_path for _, source in base.data.sources())):
            raise ValueError("the fine-tuning recipe has no eval data (data.eval_path or data.eval_fraction > 0): "
                             "trials would report no metric")
        if self.search.grace_period is not None and self.search.grace_period < base.train.eval_every:
            raise ValueError(f"search.grace_period ({self.search.grace_period}) must be at least the fine-tuning "
                             f"recipe's train.eval_every ({base.train.eval_every}): a trial is judged on an evaluation")
        self.trials()  # every point of the grid is a valid fine-tuning recipe, before any trial starts
        return self

    @property
    def mode(self) -> Literal["min", "max"]:
        return EVAL_METRIC_MODES[self.metric]

    def base(self) -> FinetuneRecipe:
        """The fine-tuning recipe with `overrides` applied: what every trial starts from."""
        return load_recipe(self.finetune, self.overrides, kind="finetune")

    def grace_period(self) -> int:
        return self.search.grace_period or self.base().train.eval_every

    def trials(self) -> list[Trial]:
        """Every distinct combination of the space, in order (the first field varies slowest)."""
        base = self.base()
        raw = base.model_dump(mode="json")
        axes = {key: getattr(self.space, key) or [raw[section][field]]
                for key, (section, field) in SPACE_FIELDS.items()}
        trials: list[Trial] = []
        for values in dict.fromkeys(itertools.product(*axes.values())):
            hparams = dict(zip(axes, values, strict=True))
            name = f"{self.name}-{len(trials):02d}"
            changed = copy.deepcopy(raw)
            for key, value in hparams.items():
                section, field = SPACE_FIELDS[key]
                changed[section][field] = value
            if self.space.max_steps:
                changed["train"]["num_epochs"] = None
            changed["run"]["name"] = name
            try:
                recipe = FinetuneRecipe.model_validate(changed)
            except ValidationError as exc:
                raise ValueError(f"space: trial {hparams} is not a valid fine-tuning recipe:\n"
                                 f"{format_errors(exc, self.finetune)}") from None
            label = " ".join(f"{_SHORT[k]}={v:g}" if isinstance(v, float) else f"{_SHORT[k]}={v}"
                             for k, v in hparams.items())
            trials.append(Trial(name, label, hparams, recipe))
        return trials

    def plan(self) -> dict:
        """What `llmc validate` prints: the trials and what each holds."""
        from workloads.finetune.plan import train_worker_resources

        base = self.base()
        return {"trials": [t.label for t in self.trials()], "workers_per_trial": base.scaling.num_workers,
                "resources_per_trial": trial_resources(base, self.search.driver_cpus),
                "metric": self.metric, "mode": self.mode, "scheduler": self.search.scheduler,
                "grace_period": self.grace_period(), "worker_resources": train_worker_resources(base)}


def trial_resources(base: FinetuneRecipe, driver_cpus: float) -> dict[str, float]:
    """What one trial holds at once: its driver's CPUs and its Ray Train workers' resources."""
    from workloads.finetune.plan import train_worker_resources

    held = {key: amount * base.scaling.num_workers for key, amount in train_worker_resources(base).items()}
    held["CPU"] = held.get("CPU", 0) + driver_cpus
    return held
