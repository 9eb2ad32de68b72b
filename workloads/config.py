"""Recipe schemas: the one place a field, its default, its bounds and its help are written.

`load_recipe(path, overrides)` reads YAML, applies `--set a.b=value` overrides and validates it,
raising `RecipeError` whose message names every bad field, its value and what is allowed. This
module imports neither torch nor Ray, so validation runs before any cluster or model work.
"""

from __future__ import annotations

import glob
import json
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


class RecipeError(ValueError):
    """A recipe that cannot run; the message names each bad field and what it allows."""


# Run, model and adapter names: safe in paths and URLs; at least one character is not a dot (no . or ..).
_NAME = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"


class StrictModel(BaseModel):
    """A recipe block: unknown fields are errors (a typo never passes silently); assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# Shared blocks
# ---------------------------------------------------------------------------------------------


class TinyModelConfig(StrictModel):
    """The Llama built on the spot when `model.name` is `tiny`: its shape, then its pretraining.

    It is pretrained once, single process, on generated addition chats in its own phrasing ("What is 49 plus
    97?"), so it can add but has not seen the bundled task's phrasing; the result is cached under a key of
    every field here and the corpus.
    """

    hidden_size: int = Field(128, ge=16, description="Width of the residual stream.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads (also key/value heads).")
    intermediate_size: int = Field(384, ge=16, description="MLP width.")
    vocab_size: int = Field(512, ge=128, description="Most BPE tokens learned from the bundled corpus.")
    max_position_embeddings: int = Field(512, ge=64, description="Longest sequence the model accepts.")
    seed: int = Field(0, description="Seed for weights, tokenizer and pretraining order: same seed, same model.")
    pretrain_steps: int = Field(
        1500, ge=0, description="Optimizer steps of pretraining on the generated corpus; 0: random weights."
    )
    pretrain_batch_size: int = Field(32, ge=1, description="Conversations per pretraining step.")
    pretrain_learning_rate: float = Field(2e-3, gt=0, le=1.0, description="Peak AdamW learning rate (cosine).")
    pretrain_warmup_steps: int = Field(100, ge=0, description="Linear warmup before the cosine decay.")
    pretrain_threads: int = Field(
        1, ge=1, description="torch threads while pretraining; fixed, so a rebuild gives the same weights."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelConfig(StrictModel):
    name: str = Field(
        ..., description="`tiny` (built locally and cached), `smollm2-135m` (SmolLM2-135M-Instruct, its GGUF taken "
        "from a PyPI wheel and converted once), a hub id, or a local directory; with `gguf`, the model's label "
        "(default: the file's stem)."
    )
    gguf: str | None = Field(
        None, description="A llama-architecture GGUF file (llama.cpp, ollama) to convert once into a cached "
        "transformers directory and use as the model; its header is checked when the recipe is read."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for training and serving (float32 on CPU)."
    )
    trust_remote_code: Literal[False] = Field(False, description="Never: model code is not executed.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `name`; None: default.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel for training (transformers' attn_implementation); None: its default."
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat template that replaces the tokenizer's own (for training and data checks)."
    )

    @model_validator(mode="before")
    @classmethod
    def _label_from_gguf(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gguf") and not data.get("name"):
            return {**data, "name": Path(str(data["gguf"])).stem}
        return data

    @field_validator("gguf")
    @classmethod
    def _gguf_usable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"no GGUF file at {value}")
        from workloads.real_models import check_gguf

        check_gguf(path)  # architecture and tensor types, from the header: refused here, before any work
        return str(path.resolve())


DataFormat = Literal["alpaca", "messages", "sharegpt", "text"]
# The fields each format reads from a row; `columns` may map any of them onto a column of another name.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"), "messages": ("messages",), "sharegpt": ("conversations",),
    "text": ("text",),
}
_FORMAT_HELP = "alpaca: instruction/input/output; messages: OpenAI chat; sharegpt; text: raw."
_SOURCES = ("path", "data_files", "hub")


class _DatasetSource(StrictModel):
    """Where one dataset's rows come from, and which of its columns hold its format's fields."""

    path: str | None = Field(
        None, description="A JSON, JSONL, Parquet or CSV file (read by its suffix, other suffixes as JSON), or a "
        "directory written by `datasets` `save_to_disk`; relative to the working dir or repo."
    )
    data_files: list[str] | None = Field(
        None, min_length=1, description="Local files or glob patterns read as one dataset by "
        "`datasets.load_dataset(builder, data_files=...)` (e.g. shards: data/train-*.parquet)."
    )
    builder: Literal["json", "csv", "parquet"] | None = Field(
        None, description="Reader of `path` or `data_files`; null: from the (first) file's suffix."
    )
    hub: str | None = Field(
        None, description="A Hugging Face hub dataset id, read with `datasets.load_dataset(hub, subset, split=split)`"
        "; needs a reachable hub (probed with a short timeout first) or, with HF_HUB_OFFLINE=1, its local cache."
    )
    subset: str | None = Field(None, description="The hub dataset's configuration (subset) name.")
    split: str = Field(
        "train", min_length=1, description="Split read from `hub`, or from a `save_to_disk` directory holding a "
        "DatasetDict."
    )
    format: DataFormat | None = Field(
        None, description=f"{_FORMAT_HELP} Required for one dataset; in `data` beside `datasets`, the format of the "
        "entries that name none."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Format field: the dataset's column holding it, e.g. {instruction: question, "
        "output: answer} trains a question,answer CSV as alpaca; fields not named here are read from columns of their "
        "own name. Fields per format: " + "; ".join(f"{f}: {', '.join(v)}" for f, v in FORMAT_FIELDS.items()) + "."
    )
    eval_path: str | None = Field(
        None, description="Separate eval file or save_to_disk directory, read like `path` (builder, columns); else "
        "`eval_fraction` of this dataset is held out."
    )

    @field_validator("path", "eval_path")
    @classmethod
    def _file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not paths_checked(info) and resolve_path(value) is None:
            raise ValueError(f"file not found (looked in {Path.cwd()} and {REPO_ROOT})")
        return value

    @field_validator("data_files")
    @classmethod
    def _files_match(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        missing = [pattern for pattern in value or [] if not paths_checked(info) and not resolve_files(pattern)]
        if missing:
            raise ValueError(f"no file matches {missing} (looked in {Path.cwd()} and {REPO_ROOT})")
        return value

    @field_validator("hub")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", value):
            raise ValueError("a hub dataset id is NAME or OWNER/NAME (letters, digits, '_', '.', '-')")
        return value

    @field_validator("columns")
    @classmethod
    def _columns_fit_format(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        fmt = info.data.get("format")
        if fmt is not None:
            _check_columns(value, fmt)
        return value

    def _check_source(self) -> None:
        """Exactly one of path, data_files, hub, and only the options that source reads."""
        given = [name for name in _SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of path, data_files or hub; got {', '.join(given) or 'none'}")
        if self.builder is not None and self.hub is not None:
            raise ValueError("builder reads local files (path, data_files): not a hub dataset")
        if self.subset is not None and self.hub is None:
            raise ValueError("subset names a configuration of a hub dataset: set hub, or drop subset")
        on_disk = self.path is not None and (resolved := resolve_path(self.path)) is not None and resolved.is_dir()
        if self.split != "train" and not (self.hub or on_disk):
            raise ValueError(f"split {self.split!r} needs a hub dataset or a save_to_disk DatasetDict directory: a "
                             "file holds one split, train")


def _check_columns(columns: dict[str, str], fmt: str) -> None:
    unknown = sorted(set(columns) - set(FORMAT_FIELDS[fmt]))
    if unknown:
        raise ValueError(f"columns: {unknown} are not fields of format {fmt!r}; allowed: "
                         f"{', '.join(FORMAT_FIELDS[fmt])} (a field: the column holding it)")


class DatasetConfig(_DatasetSource):
    """One dataset of a mix (`data.datasets`)."""

    weight: float = Field(1.0, gt=0, description="Share of the mixed training set, relative to the other datasets' "
                                                 "weights (see data.datasets).")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        self._check_source()
        return self


class DataConfig(_DatasetSource):
    """The training data: one dataset (path, data_files or hub, with its format) or a weighted mix (`datasets`)."""

    datasets: list[DatasetConfig] | None = Field(
        None, min_length=1, description="Several datasets mixed into one training set, instead of the one-dataset "
        "fields (path, data_files, hub, builder, subset, split, columns, eval_path); `format` is their default. Each "
        "contributes round(weight / sum of weights x N) examples, N the sum of their examples: all of its examples "
        "as often as fit whole, then a seeded random sample of the rest (so a weight above its share of N repeats "
        "it, one below subsamples it); the mix is then shuffled with train.seed. Eval: each dataset's eval set, "
        "concatenated."
    )
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of each dataset held out for eval when it "
                                                                    "has no eval_path.")
    max_length: int = Field(256, ge=8, description="Tokens per example (or per pack); longer is cut.")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens.")
    packing: bool = Field(
        False, description="Put whole examples, in order, into blocks of up to `max_length` tokens. Each example "
        "keeps its own position_ids (from 0) and a block-diagonal causal attention mask stops it from attending to "
        "the others in its block, so a packed example trains as it would alone. Needs sdpa attention "
        "(model.attn_implementation null or sdpa)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use only the first N training records (of each dataset).")
    system_prompt: str | None = Field(None, description="Prepended as a system turn to every example.")

    @model_validator(mode="after")
    def _one_form(self) -> DataConfig:
        if self.datasets is None:
            self._check_source()
            if self.format is None:
                raise ValueError(f"format is required; allowed: {', '.join(FORMAT_FIELDS)}")
            return self
        single = [name for name in (*_SOURCES, "builder", "subset", "eval_path") if getattr(self, name) is not None]
        single += ["columns"] * bool(self.columns) + ["split"] * (self.split != "train")
        if single:
            raise ValueError(f"datasets replaces the one-dataset fields: move {', '.join(single)} into its entries")
        for i, dataset in enumerate(self.datasets):
            if dataset.format is None and self.format is None:
                raise ValueError(f"datasets.{i}.format is required (or a default data.format); allowed: "
                                 f"{', '.join(FORMAT_FIELDS)}")
            try:
                _check_columns(dataset.columns, dataset.format or self.format)
            except ValueError as exc:
                raise ValueError(f"datasets.{i}.{exc}") from None
        return self

    def sources(self) -> list[tuple[str, DatasetConfig]]:
        """Every dataset, format filled in, with the field that names it in errors: `data` or `data.datasets.I`."""
        if self.datasets is None:
            fields = set(_DatasetSource.model_fields)
            own = {k: v for k, v in self.__dict__.items() if k in fields}  # validated with this config already
            return [("data", DatasetConfig.model_validate(own, context=PATHS_CHECKED))]
        return [(f"data.datasets.{i}", d if d.format else d.model_copy(update={"format": self.format}))
                for i, d in enumerate(self.datasets)]


def resolve_files(pattern: str) -> list[Path]:
    """Files matching a path or glob pattern, as given or else relative to the repository; sorted."""
    given = Path(pattern).expanduser()
    for base in (Path.cwd(), REPO_ROOT):
        full = given if given.is_absolute() else base / given
        matches = sorted(Path(p).resolve() for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        if matches:
            return matches
    return []


_FALLBACKS_SAID: set[str] = set()
# Validation context of a recipe the driver already checked and whose data it read (a train worker's copy): its data
# paths are not looked up again, since on another node of a cluster they need not exist.
PATHS_CHECKED = {"paths_checked": True}


def paths_checked(info: ValidationInfo) -> bool:
    """Whether a validator is told (`PATHS_CHECKED`) that the driver has already looked its paths up."""
    return bool(info.context and info.context.get("paths_checked"))


def resolve_path(value: str) -> Path | None:
    """A data or recipe path as given, else relative to the repository (said once on stderr); None if neither."""
    given = Path(value).expanduser()
    if given.exists():
        return given.resolve()
    bundled = REPO_ROOT / value
    if not given.is_absolute() and bundled.exists():
        if value not in _FALLBACKS_SAID:
            _FALLBACKS_SAID.add(value)
            print(f"[llmc] {value!r} is not under {Path.cwd()}: using the repository's {bundled}", file=sys.stderr)
        return bundled.resolve()
    return None


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank of a PEFT adapter directory: its `r`, or a larger one in its `rank_pattern`."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])


class LoraConfig(StrictModel):
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
        description="Module names to adapt, or `all-linear` (every linear layer but the output head).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (PEFT). vLLM cannot serve DoRA adapters.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")


class QuantizationConfig(StrictModel):
    """bitsandbytes 4-bit base weights for QLoRA."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Matmul dtype; bfloat16 on GPUs."
    )


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


# Tracking backend -> (module it imports, what to pip install).
TRACKER_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "mlflow-skinny"),
                    "wandb": ("wandb", "wandb")}


class TrackingConfig(StrictModel):
    """Experiment trackers that rank 0 of training logs to: the resolved recipe once, metrics every step."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Any of tensorboard (event files), mlflow (a local file store unless "
        "mlflow_tracking_uri says otherwise), wandb (offline runs; sync them later with `wandb sync`)."
    )
    dir: str | None = Field(
        None, description="Where trackers write: tensorboard/, mlruns/, wandb/; null: `<run dir>/tracking` (emptied "
        "when a run starts fresh). On a multi-node cluster name a path every node shares."
    )
    experiment: str = Field("llmc", min_length=1, description="MLflow experiment and W&B project of the run.")
    mlflow_tracking_uri: str | None = Field(
        None, description="An MLflow tracking server (http://host:5000) or store URI; null: the file store "
        "`dir`/mlruns (MLflow 3 opens it only with MLFLOW_ALLOW_FILE_STORE=true, e.g. for `mlflow ui`)."
    )

    @field_validator("backends")
    @classmethod
    def _installed_once(cls, value: list[str]) -> list[str]:
        import importlib.util

        if len(set(value)) != len(value):
            raise ValueError("each backend may be named once")
        missing = [f"{b} needs the `{TRACKER_PACKAGES[b][0]}` module: pip install {TRACKER_PACKAGES[b][1]}"
                   for b in value if importlib.util.find_spec(TRACKER_PACKAGES[b][0]) is None]
        if missing:
            raise ValueError("; ".join(missing))
        return value


RESUME_LATEST = "latest"  # run.resume_from: continue this run's newest checkpoint


class RunConfig(StrictModel):
    name: str = Field("run", pattern=_NAME, description="Run directory name.")
    output_dir: str = Field("runs", description="Parent of the run directory (summary, plots, model).")
    storage_path: str | None = Field(
        None, description="Ray Train storage (checkpoints): local dir or s3:// URI; default output_dir."
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    resume_from: str | None = Field(
        None, description="A checkpoint directory to continue from, or `latest`: this run name's newest checkpoint "
                          "in its storage. Without it a run starts fresh and replaces that storage."
    )
    merge_adapter: bool = Field(False, description="Also write base+adapter merged weights.")
    forward_env: list[str] = Field(
        default_factory=list,
        description="Environment variables `llmc submit` forwards to the job (e.g. HF_TOKEN for gated weights).",
    )


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


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


RECIPES: dict[str, type[StrictModel]] = {"finetune": FinetuneRecipe}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None, kind: str | tuple[str, ...] | None = None) -> Any:
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


def validate_recipe(raw: dict, kind: str | tuple[str, ...] | None = None, source: str = "recipe") -> Any:
    """Validate a recipe mapping against the schema its `kind` names, which must be the one (or one of those) asked
    for; a recipe that names no kind is the first asked for, else finetune."""
    asked = (kind,) if isinstance(kind, str) else tuple(kind or ())
    kind = raw.get("kind", asked[0] if asked else "finetune")
    if (asked and kind not in asked) or kind not in RECIPES:
        allowed = ", ".join(asked or sorted(RECIPES))
        raise RecipeError(f"{source}: field 'kind': got {kind!r}; allowed: {allowed}")
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


# ---------------------------------------------------------------------------------------------
# Serving and offline generation (kind: serve; `llmc serve` and `llmc generate` read the same recipe)
# ---------------------------------------------------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class EngineOptions(StrictModel):
    """vLLM engine knobs every engine of this project takes (a serve recipe's `engine`, PPO/GRPO's `rl.engine`);
    continuous batching is the engine's, these bound it."""

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs (engine workers) one engine shards over.")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Most sequences batched together per engine step.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Tokens per engine step; null: vLLM's default.")
    kv_cache_gib: float = Field(1.0, gt=0, le=1024, description="CPU only: host RAM for the KV cache (GiB).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: memory fraction for weights + KV.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    enforce_eager: bool = Field(True, description="No CUDA graphs / compilation: quicker start, slower steps (set "
                                                  "false on GPUs for CUDA graphs).")


class EngineConfig(EngineOptions):
    """A serve recipe's engine: the shared knobs, and what only a served model has (its name, context, seed,
    pipeline stages, tool-call parser)."""

    model_id: str = Field("tiny", pattern=_NAME, description="Name clients send as `model`; adapters: MODEL_ID:NAME.")
    pipeline_parallel_size: int = Field(1, ge=1, le=16, description="Pipeline stages per replica.")
    max_model_len: int = Field(512, ge=16, description="Context length: prompt plus generated tokens.")
    seed: int = Field(0, description="Engine sampling seed.")
    tool_call_parser: str | None = Field(
        None, min_length=1, description="vLLM's tool-call parser for the model's chat template (hermes for the tiny "
        "model, llama3_json for Llama 3.1+): chat requests with `tools` get the calls back as `tool_calls` (auto tool "
        "choice); null: such requests get 400. Checked against vLLM's parsers when `llmc serve` starts.")


# Resources Ray defines itself: a recipe asks for them through their own fields, never `resources.custom`.
_BUILT_IN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class ServeResourcesConfig(StrictModel):
    """Resources of each engine worker (one per tensor x pipeline rank) of one replica."""

    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, description="Logical CPUs per engine worker.")
    gpus_per_worker: float = Field(1, gt=0, le=8, description="GPUs per engine worker when use_gpu is true.")
    accelerator_type: str | None = Field(None, description="e.g. H100: pin replicas to that GPU type.")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="How one replica's workers are placed; STRICT_PACK keeps TP on one node."
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine worker asks for, e.g. {serve_pool: 1}: replicas go only to "
                    "nodes started with them (`ray start --resources='{\"serve_pool\": 4}'`).",
    )

    @field_validator("custom")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        built_in = [name for name in value if name in _BUILT_IN_RESOURCES or name.startswith("accelerator_type:")]
        if built_in:
            raise ValueError(f"{built_in} have fields of their own (cpus_per_worker, gpus_per_worker, "
                             "accelerator_type): custom names only the resources a node is started with")
        bad = {name: amount for name, amount in value.items() if not name.strip() or not amount > 0}
        if bad:
            raise ValueError(f"each custom resource needs a name and an amount above 0, got {bad}")
        return value


class AutoscalingConfig(StrictModel):
    """Replica count and backpressure of the model deployment (Ray Serve autoscaling)."""

    min_replicas: int = Field(1, ge=0, le=256, description="Replicas kept even when idle (0: scale to zero).")
    max_replicas: int = Field(1, ge=1, le=256, description="Upper bound the autoscaler may reach.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start; null: min_replicas.")
    target_ongoing_requests: float = Field(8, gt=0, description="In-flight requests per replica to aim at.")
    upscale_delay_s: float = Field(10, ge=0, description="Load must persist this long before adding replicas.")
    downscale_delay_s: float = Field(120, ge=0, description="Idle time before removing replicas.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one replica runs at once; beyond it they queue.")
    max_queued_requests: int = Field(
        64, ge=-1, description="Queue bound per caller; when full, clients get 503 at once (-1: unbounded)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError("target_ongoing_requests above max_ongoing_requests can never be reached")
        return self


class AdaptersConfig(StrictModel):
    """LoRA adapters served by name beside the base model, from an object store."""

    enabled: bool = Field(True, description="Serve LoRA adapters (vLLM enable_lora).")
    paths: dict[str, str] = Field(
        default_factory=dict, description="NAME: local PEFT adapter dir, uploaded to store_uri/NAME at start."
    )
    store_uri: str = Field("s3://llmc-adapters/tiny", description="Object-store folder with one folder per adapter.")
    endpoint_url: str | None = Field(
        "local", description="`local`: an S3 endpoint on 127.0.0.1 started on demand; null: the provider's; or a URL."
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank the engine accepts.")
    max_adapters_per_replica: int = Field(4, ge=1, description="Adapters one replica keeps loaded.")

    @field_validator("paths")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value if not re.match(_NAME, name)]
        if bad:
            raise ValueError(f"adapter names {bad} may hold only letters, digits, '_', '.', '-', and not be . or ..")
        return value

    @model_validator(mode="after")
    def _store(self) -> AdaptersConfig:
        if not self.store_uri.startswith(("s3://", "gs://", "abfss://", "azure://")):
            raise ValueError("store_uri must be an object-store URI (s3://, gs://, abfss://, azure://)")
        if self.endpoint_url == "local" and not self.store_uri.startswith("s3://"):
            raise ValueError("endpoint_url `local` is an S3 endpoint: store_uri must start with s3://")
        return self


class ServerConfig(StrictModel):
    host: str = Field("127.0.0.1", description="HTTP bind address; anything but loopback needs an API key.")
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted bearer keys (prefer api_key_env: recipes get committed)."
    )
    api_key_env: str | None = Field(
        "LLMC_API_KEYS", description="Environment variable with comma-separated accepted keys, added to api_keys."
    )
    allow_unauthenticated: bool = Field(False, description="Allow a non-loopback host with no key at all.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (e.g. https://app.example.com); empty: no cross-origin "
                    "access. Preflight requests are answered before the key check.",
    )
    ingress_replicas: int = Field(1, ge=1, le=64, description="Replicas of the HTTP router (cache is per replica).")


class CacheConfig(StrictModel):
    max_entries: int = Field(1024, ge=0, description="Deterministic (temperature 0) answers kept; 0 turns it off.")


class SamplingConfig(StrictModel):
    """Defaults of `llmc generate`; a prompt row may override each one."""

    max_tokens: int = Field(64, ge=1, description="Generated tokens per sample.")
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64, description="Samples per prompt.")
    stop: list[str] = Field(default_factory=list, description="Stop sequences.")
    seed: int | None = Field(0, description="Per-request seed: same seed, same samples.")


class ServeRecipe(StrictModel):
    kind: Literal["serve"] = "serve"
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)
    resources: ServeResourcesConfig = Field(default_factory=ServeResourcesConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    generate: SamplingConfig = Field(default_factory=SamplingConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> ServeRecipe:
        s, e = self.server, self.engine
        if (s.host not in LOOPBACK_HOSTS and not s.api_keys and not s.api_key_env and not s.allow_unauthenticated):
            raise ValueError(
                f"server.host {s.host!r} is not loopback and no API key source is set: set server.api_keys or "
                "server.api_key_env, or server.allow_unauthenticated: true to serve without keys"
            )
        if self.model.dtype == "float16" and not self.resources.use_gpu:
            raise ValueError("model.dtype float16 needs GPUs (resources.use_gpu: true); use float32 or bfloat16 on CPU")
        if self.model.name == "tiny" and e.max_model_len > self.model.tiny.max_position_embeddings:
            raise ValueError(f"engine.max_model_len ({e.max_model_len}) exceeds the tiny model's "
                             f"max_position_embeddings ({self.model.tiny.max_position_embeddings})")
        if self.generate.max_tokens >= e.max_model_len:
            raise ValueError("generate.max_tokens must leave room for the prompt within engine.max_model_len")
        return self


RECIPES["serve"] = ServeRecipe
