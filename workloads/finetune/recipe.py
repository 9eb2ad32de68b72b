"""The fine-tuning recipe (kind: finetune) and its blocks: `train`, `eval`, `deepspeed` and `scaling`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from workloads.common.recipe import StrictModel
from workloads.common.run import RunConfig
from workloads.common.tracking import TrackingConfig
from workloads.data.recipe import DataConfig
from workloads.models.recipe import LoraConfig, ModelConfig, QuantizationConfig


class DeepSpeedConfig(StrictModel):
    enabled: bool = Field(True, description="False: plain PyTorch DDP.")
    stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Optimizer states in CPU memory (stage 1-3).")
    offload_params: bool = Field(False, description="Parameters in CPU memory (stage 3 only).")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs stage 1, 2 or 3")
        return self


class ScalingConfig(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on a cluster).")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1, description="Logical CPUs per worker; also its torch threads.")
    gpus_per_worker: int = Field(1, ge=0, description="GPUs per worker when use_gpu is true.")
    accelerator_type: str | None = Field(None, description="e.g. A100: pin workers to that GPU type.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers' bundles share nodes: PACK fills a node first, STRICT_SPREAD one per node."
    )


class TrainConfig(StrictModel):
    method: Literal["full", "lora", "qlora"] = Field(..., description="What is trained.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps; set this or num_epochs (exactly one decides the run's length)."
    )
    num_epochs: float | None = Field(
        None, gt=0, description="Passes over the training data (fractions allowed); the step count follows from the "
        "examples, micro_batch_size, gradient_accumulation_steps and scaling.num_workers. Set this or max_steps."
    )
    micro_batch_size: int = Field(8, ge=1, description="Examples per worker per forward.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (or use warmup_ratio).")
    warmup_ratio: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="Warmup as a fraction of the run's steps (max_steps, or those num_epochs resolves to); replaces "
                    "warmup_steps when set.",
    )
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Floor of the linear and cosine decay, as a fraction of learning_rate."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw: torch AdamW; adamw_8bit: bitsandbytes AdamW with 8-bit moments (a quarter of "
        "the optimizer memory; the usual pairing with QLoRA); paged_adamw_8bit: the same, paged to CPU memory under "
        "GPU memory pressure (CUDA only)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(20, ge=1, description="Steps between evaluations (and one at the last step); see `eval`.")
    checkpoint_every: int = Field(20, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept in storage.")
    log_every: int = Field(5, ge=1)
    seed: int = 0
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.max_steps is None) == (self.num_epochs is None):
            got = "both" if self.max_steps is not None else "neither"
            raise ValueError(f"set exactly one of max_steps and num_epochs, got {got} (max_steps={self.max_steps}, "
                             f"num_epochs={self.num_epochs}); to switch, set the other to null")
        return self

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps`: from warmup_ratio when it is set, else warmup_steps."""
        return round(self.warmup_ratio * total_steps) if self.warmup_ratio is not None else self.warmup_steps


# What each metric an evaluation reports counts as better: early stopping and keep_best follow it.
EVAL_METRIC_MODES: dict[str, Literal["min", "max"]] = {
    "eval_loss": "min", "eval_perplexity": "min", "eval_exact_match": "max",
}


class EvalConfig(StrictModel):
    """What each evaluation (every `train.eval_every` steps, and at the last) measures beyond eval loss and
    perplexity, and what it decides: early stopping and the checkpoint the model is exported from."""

    generate: bool = Field(
        False, description="Also reply greedily to eval prompts and score each reply against the reference "
        "answer: metric eval_exact_match, the share scored right."
    )
    generate_samples: int = Field(
        16, ge=1, description="Eval examples replied to (the first N of the eval set): bounds the cost of a pass."
    )
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Most tokens generated per reply.")
    scorer: Literal["final_number", "exact"] = Field(
        "final_number", description="A scorer of workloads.scoring's registry. final_number: the reply's answer "
        "number (after '#### ', 'Answer:' or 'The answer is', else its last number; sign, thousands commas and "
        "decimals read) equals the reference's (arithmetic, GSM8K-style answers); exact: reply and reference are "
        "equal ignoring case, punctuation and spacing."
    )
    metric: Literal["eval_loss", "eval_perplexity", "eval_exact_match"] = Field(
        "eval_loss", description="What early stopping and keep_best follow; lower is better for eval_loss and "
        "eval_perplexity, higher for eval_exact_match (needs generate)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations in a row that do not improve `metric` by more "
        "than min_delta; null: never stop early."
    )
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change of `metric` that counts as an improvement.")
    keep_best: bool = Field(
        False, description="Export the model (adapter) from the checkpoint with the best `metric` instead of the "
        "last step's; that checkpoint is kept in storage whatever train.keep_checkpoints says."
    )

    @model_validator(mode="after")
    def _metric_is_measured(self) -> EvalConfig:
        if self.metric == "eval_exact_match" and not self.generate:
            raise ValueError("metric eval_exact_match is measured only with generate: true")
        return self

    @property
    def mode(self) -> Literal["min", "max"]:
        """Whether lower (min) or higher (max) values of `metric` are better."""
        return EVAL_METRIC_MODES[self.metric]


class FinetuneRecipe(StrictModel):
    kind: Literal["finetune"] = "finetune"
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def output_dir(self, given: str | Path | None = None) -> Path:
        """Where a run of this recipe writes: `given` (--output-dir), else `run.output_dir`/`run.name`."""
        return self.run.directory(given)

    @field_validator("data")
    @classmethod
    def _packing_isolates(cls, data: DataConfig, info: ValidationInfo) -> DataConfig:
        attn = getattr(info.data.get("model"), "attn_implementation", None)
        if data.packing and attn not in (None, "sdpa"):
            reason = ("adds the mask to its scores and cannot read the boolean block mask" if attn == "eager"
                      else "ignores a 4D attention mask on a batch of blocks")
            raise ValueError(f"packing isolates each packed example with a block-diagonal attention mask, which "
                             f"model.attn_implementation {attn!r} {reason}: set model.attn_implementation to null or "
                             "sdpa, or packing: false")
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> FinetuneRecipe:
        if self.train.method == "qlora" and self.deepspeed.enabled and self.deepspeed.offload_params:
            raise ValueError("deepspeed.offload_params cannot move 4-bit weights: turn it off for qlora")
        if self.train.optimizer == "paged_adamw_8bit" and not self.scaling.use_gpu:
            raise ValueError("train.optimizer paged_adamw_8bit pages through CUDA unified memory: it needs "
                             "scaling.use_gpu: true; on CPU use adamw_8bit")
        if self.train.optimizer != "adamw" and self.deepspeed.enabled and self.deepspeed.offload_optimizer:
            raise ValueError(f"train.optimizer {self.train.optimizer} runs where the weights are; "
                             "deepspeed.offload_optimizer runs DeepSpeed's own CPU Adam: choose one (adamw offloads)")
        if self.model.dtype == "float16" and not self.scaling.use_gpu:
            raise ValueError("model.dtype float16 needs GPUs (scaling.use_gpu: true); use float32 on CPU")
        ev, sources = self.eval, [source for _, source in self.data.sources()]
        if ev.generate and all(source.format == "text" for source in sources):
            raise ValueError("eval.generate needs a chat data.format (alpaca, messages or sharegpt): text has no "
                             "reply to score")
        if (ev.generate or ev.keep_best or ev.early_stopping_patience) and not (
                self.data.eval_fraction > 0 or any(source.eval_path for source in sources)):
            raise ValueError("eval.generate, eval.keep_best and eval.early_stopping_patience need eval data: set "
                             "data.eval_path or data.eval_fraction > 0")
        return self
