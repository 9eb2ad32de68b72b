"""Recipe schemas: the one place a field, its default, its bounds and its help are written.

`load_recipe(path, overrides)` reads YAML, applies `--set a.b=value` overrides and validates it,
raising `RecipeError` whose message names every bad field, its value and what is allowed. This
module imports neither torch nor Ray, so validation runs before any cluster or model work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent


class RecipeError(ValueError):
    """A recipe that cannot run; the message names each bad field and what it allows."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# Shared blocks
# ---------------------------------------------------------------------------------------------


class TinyModelConfig(_Strict):
    """Shape of the Llama built on the spot when `model.name` is `tiny`."""

    hidden_size: int = Field(128, ge=16, description="Width of the residual stream.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads (also key/value heads).")
    intermediate_size: int = Field(384, ge=16, description="MLP width.")
    vocab_size: int = Field(512, ge=128, description="Most BPE tokens learned from the bundled corpus.")
    max_position_embeddings: int = Field(512, ge=64, description="Longest sequence the model accepts.")
    seed: int = Field(0, description="Seed for weights and tokenizer: same seed, same model.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelConfig(_Strict):
    name: str = Field(..., description="`tiny` (built locally and cached), a hub id, or a local directory.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for training and serving (float32 on CPU)."
    )
    trust_remote_code: Literal[False] = Field(False, description="Never: model code is not executed.")


class DataConfig(_Strict):
    path: str = Field(..., description="JSON, JSONL or Parquet file, relative to the working dir or repo.")
    format: Literal["alpaca", "messages", "sharegpt", "text"] = Field(
        ..., description="alpaca: instruction/input/output; messages: OpenAI chat; sharegpt; text: raw."
    )
    eval_path: str | None = Field(None, description="Separate eval file; else `eval_fraction` is held out.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_length: int = Field(256, ge=8, description="Tokens per example (or per pack); longer is cut.")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens.")
    packing: bool = Field(False, description="Concatenate examples into `max_length` blocks.")
    max_samples: int | None = Field(None, ge=1, description="Use only the first N training records.")
    system_prompt: str | None = Field(None, description="Prepended as a system turn to every example.")

    @field_validator("path", "eval_path")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and resolve_path(value) is None:
            raise ValueError(f"file not found (looked in {Path.cwd()} and {REPO_ROOT})")
        return value


def resolve_path(value: str) -> Path | None:
    """A data or recipe path as given, else relative to the repository; None if neither exists."""
    for candidate in (Path(value).expanduser(), REPO_ROOT / value):
        if candidate.exists():
            return candidate.resolve()
    return None


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )


class QuantizationConfig(_Strict):
    """bitsandbytes 4-bit base weights for QLoRA."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Matmul dtype; bfloat16 on GPUs."
    )


class DeepSpeedConfig(_Strict):
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


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on a cluster).")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1, description="Logical CPUs per worker; also its torch threads.")
    gpus_per_worker: int = Field(1, ge=0, description="GPUs per worker when use_gpu is true.")
    accelerator_type: str | None = Field(None, description="e.g. H100: pin workers to that GPU type.")


class TrainConfig(_Strict):
    method: Literal["full", "lora", "qlora"] = Field(..., description="What is trained.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per worker per forward.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(20, ge=1, description="Steps between eval-loss passes.")
    checkpoint_every: int = Field(20, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept in storage.")
    log_every: int = Field(5, ge=1)
    seed: int = 0
    gradient_checkpointing: bool = False


class RunConfig(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$", description="Run directory name.")
    output_dir: str = Field("runs", description="Parent of the run directory (summary, plots, model).")
    storage_path: str | None = Field(
        None, description="Ray Train storage (checkpoints): local dir or s3:// URI; default output_dir."
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    resume_from: str | None = Field(None, description="A checkpoint directory to continue from.")
    merge_adapter: bool = Field(False, description="Also write base+adapter merged weights.")


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


class FinetuneRecipe(_Strict):
    kind: Literal["finetune"] = "finetune"
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> FinetuneRecipe:
        if self.train.method == "qlora" and self.deepspeed.enabled and self.deepspeed.offload_params:
            raise ValueError("deepspeed.offload_params cannot move 4-bit weights: turn it off for qlora")
        if self.model.dtype == "float16" and not self.scaling.use_gpu:
            raise ValueError("model.dtype float16 needs GPUs (scaling.use_gpu: true); use float32 on CPU")
        return self


RECIPES: dict[str, type[_Strict]] = {"finetune": FinetuneRecipe}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None, kind: str | None = None) -> Any:
    """Read, override and validate a recipe; raises RecipeError naming every bad field."""
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
    return validate_recipe(raw, kind=kind, source=str(path))


def validate_recipe(raw: dict, kind: str | None = None, source: str = "recipe") -> Any:
    """Validate a recipe mapping against the schema its `kind` names (or the one asked for)."""
    kind = kind or raw.get("kind", "finetune")
    if raw.get("kind", kind) != kind or kind not in RECIPES:
        allowed = ", ".join(sorted(RECIPES)) if kind not in RECIPES else kind
        raise RecipeError(f"{source}: field 'kind': got {raw.get('kind', kind)!r}; allowed: {allowed}")
    try:
        return RECIPES[kind].model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, source)) from None


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
