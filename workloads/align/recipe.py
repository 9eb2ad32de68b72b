"""The alignment recipe (`kind: align`, `llmc align`): one schema for every method, registered beside finetune.

`method` picks what is trained from preference pairs: `reward` (a reward model, TRL's RewardTrainer) or `dpo`
(a policy, TRL's DPOTrainer). `ppo` and `grpo` are named so a recipe can say what it wants, and refused at
validation: they are not built yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from workloads.config import (
    RECIPES,
    DeepSpeedConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    ScalingConfig,
    StrictModel,
    resolve_path,
)

BUILT_METHODS = ("reward", "dpo")
PLANNED_METHODS = ("ppo", "grpo")  # issue 12: one RL loop for both, not built yet


class PreferenceDataConfig(StrictModel):
    """Preference pairs in TRL's format: `chosen` and `rejected` (strings, or lists of chat messages), with an
    optional shared `prompt`; JSON, JSONL, Parquet or CSV, read like finetune data."""

    path: str = Field(..., description="Training pairs, relative to the working dir or the repository.")
    eval_path: str | None = Field(
        None, description="Held-out pairs (the reported accuracy and margins); null: `eval_fraction` of `path`."
    )
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of `path` held out when there is no eval_path (seeded by train.seed)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use only the first N training pairs.")
    max_length: int = Field(
        256, ge=8, description="Most tokens of prompt plus answer; TRL drops longer pairs (reward) or truncates (dpo)."
    )

    @field_validator("path", "eval_path")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and resolve_path(value) is None:
            raise ValueError(f"file not found (looked in {Path.cwd()} and the repository)")
        return value


class AlignTrainConfig(StrictModel):
    """The optimization, as TRL's trainers (transformers' Trainer) run it on every Ray Train worker."""

    method: Literal["full", "lora"] = Field(
        "lora", description="What is trained: every weight, or a LoRA adapter (`lora`; a reward model's head is "
        "trained in full beside it)."
    )
    max_steps: int = Field(..., ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, description="Pairs per worker per forward.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    optimizer: Literal["adamw"] = Field("adamw", description="torch AdamW (DeepSpeed's, with deepspeed.enabled).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(20, ge=1, description="Steps between held-out evaluations (also before the first "
                                                  "step and after the last).")
    log_every: int = Field(5, ge=1, description="Steps between progress reports to the driver (metrics.csv gets "
                                                "every step).")
    seed: int = 0
    gradient_checkpointing: bool = False


class RewardOptions(StrictModel):
    """Reward-model training (method: reward): a scalar head on the model, Bradley-Terry loss on pairs."""

    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Pull mean rewards toward 0 (TRL's center_rewards_coefficient); null: off."
    )


class DpoOptions(StrictModel):
    """DPO (method: dpo): the policy learns the pairs directly; the reference is the starting policy."""

    beta: float = Field(0.1, gt=0.0, description="Strength of the pull toward the reference (KL coefficient).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="sigmoid: the DPO paper's loss.")
    adapter: str | None = Field(
        None, description="A PEFT adapter of model.name to start from and keep training (e.g. an SFT run's "
        "<run dir>/adapter); it is also the frozen reference. null: a fresh LoRA (`lora`), whose reference is the "
        "base with the adapter disabled."
    )

    @field_validator("adapter")
    @classmethod
    def _adapter_dir(cls, value: str | None) -> str | None:
        found = resolve_path(value) if value is not None else None
        if value is not None and (found is None or not (found / "adapter_config.json").is_file()):
            raise ValueError(f"{value!r} is not a PEFT adapter directory (no adapter_config.json)")
        return value


class AlignRecipe(StrictModel):
    kind: Literal["align"] = "align"
    method: Literal["reward", "dpo"] = Field(
        ..., description="reward: a reward model from preference pairs; dpo: a policy trained on them directly. "
        f"Planned, not built yet: {', '.join(PLANNED_METHODS)}."
    )
    model: ModelConfig
    data: PreferenceDataConfig
    train: AlignTrainConfig
    reward: RewardOptions = Field(default_factory=RewardOptions)
    dpo: DpoOptions = Field(default_factory=DpoOptions)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = Field(
        default_factory=lambda: DeepSpeedConfig(enabled=False),
        description="DeepSpeed through transformers' Trainer; off (DDP) by default: on CPU, ZeRO costs more than it "
        "saves at tiny sizes.",
    )
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _built(cls, value: object) -> object:
        if value in PLANNED_METHODS:
            raise ValueError(f"{value} is not built yet (planned: {', '.join(PLANNED_METHODS)}); allowed now: "
                             f"{', '.join(BUILT_METHODS)}")
        if value not in BUILT_METHODS:
            raise ValueError(f"allowed: {', '.join(BUILT_METHODS)} ({', '.join(PLANNED_METHODS)}: not built yet)")
        return value

    # Rules across fields sit on the later field, so an error names the block at fault.

    @field_validator("dpo")
    @classmethod
    def _adapter_continues_lora(cls, dpo: DpoOptions, info: ValidationInfo) -> DpoOptions:
        train = info.data.get("train")
        if dpo.adapter is not None and (info.data.get("method") != "dpo" or getattr(train, "method", None) != "lora"):
            raise ValueError("dpo.adapter continues a LoRA policy: it needs method: dpo and train.method: lora")
        return dpo

    @field_validator("scaling")
    @classmethod
    def _float16_on_gpu(cls, scaling: ScalingConfig, info: ValidationInfo) -> ScalingConfig:
        if getattr(info.data.get("model"), "dtype", None) == "float16" and not scaling.use_gpu:
            raise ValueError("model.dtype float16 needs GPUs (scaling.use_gpu: true); use float32 on CPU")
        return scaling

    @field_validator("run")
    @classmethod
    def _run_options(cls, run: RunConfig, info: ValidationInfo) -> RunConfig:
        if run.resume_from is not None:
            raise ValueError("run.resume_from: align runs do not resume yet (a failed worker group restarts the run "
                             "from its first step, up to run.max_failures times)")
        lora_policy = info.data.get("method") == "dpo" and getattr(info.data.get("train"), "method", None) == "lora"
        if run.merge_adapter and not lora_policy:
            raise ValueError("run.merge_adapter merges a LoRA policy into its base: it needs method: dpo and "
                             "train.method: lora")
        return run


RECIPES["align"] = AlignRecipe
