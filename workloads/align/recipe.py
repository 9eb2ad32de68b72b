"""The alignment recipe (`kind: align`, `llmc align`): one schema for every method, listed in workloads.kinds.

`method` picks what is trained: from preference pairs, `reward` (a reward model, TRL's RewardTrainer) or `dpo` (a
policy, TRL's DPOTrainer); from prompts with reference answers, `ppo`, `grpo` or `rloo` (a policy trained on its own
sampled completions, scored by the recipe's `rewards`; workloads.align.rl on Ray Train workers, each method a module of
workloads.align.methods).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from workloads.align.methods import METHODS
from workloads.align.rewards import check_arguments, check_function, term_name
from workloads.common.paths import paths_checked, resolve_path
from workloads.common.recipe import StrictModel
from workloads.common.run import RunConfig
from workloads.finetune.recipe import DeepSpeedConfig, ScalingConfig
from workloads.models.recipe import LoraConfig, ModelConfig
from workloads.serve.recipe import EngineOptions

PAIR_METHODS = ("reward", "dpo")  # trained from preference pairs, TRL inside Ray Train workers
RL_METHODS = tuple(METHODS)  # trained on the policy's own completions (workloads.align.rl), one module each
# RL methods whose advantages compare a prompt's completions with each other (rl.group_size at least 2), and how.
GROUP_METHODS = {"grpo": "normalizes rewards within each prompt's group",
                 "rloo": "baselines each completion with the mean reward of the others of its prompt's group"}
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}  # transformers' names


def _either(names: tuple[str, ...]) -> str:
    """`a, b or c`, for error messages."""
    return f"{', '.join(names[:-1])} or {names[-1]}"


class AlignDataConfig(StrictModel):
    """JSON, JSONL, Parquet or CSV rows, read like finetune data. `format: preference` (reward, dpo): pairs in TRL's
    format, `chosen` and `rejected` (strings, or lists of chat messages) with an optional shared `prompt`. A chat
    format (ppo, grpo, rloo): prompts, each row's last assistant turn its reference answer."""

    path: str = Field(..., description="Training rows, relative to the working dir or the repository.")
    format: Literal["preference", "alpaca", "messages", "sharegpt"] = Field(
        "preference", description="preference: chosen/rejected pairs (reward, dpo); alpaca (instruction/input/output), "
        "messages or sharegpt: prompts with a reference answer (ppo, grpo, rloo)."
    )
    eval_path: str | None = Field(
        None, description="Held-out rows (the reported accuracy, margins or rewards); null: `eval_fraction` of `path`."
    )
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of `path` held out when there is no eval_path (seeded by train.seed)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_length: int = Field(
        256, ge=8, description="Most tokens of prompt plus answer: TRL drops longer pairs (reward) or truncates (dpo); "
        "the RL methods (ppo, grpo, rloo) leave out prompts longer than this minus rl.max_new_tokens."
    )
    system_prompt: str | None = Field(None, description="ppo, grpo, rloo: a system turn put before every prompt.")

    @field_validator("path", "eval_path")
    @classmethod
    def _file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not paths_checked(info) and resolve_path(value) is None:
            raise ValueError(f"file not found (looked in {Path.cwd()} and the repository)")
        return value


class AlignTrainConfig(StrictModel):
    """The optimization, as TRL's trainers (transformers' Trainer) run it on every Ray Train worker."""

    method: Literal["full", "lora"] = Field(
        "lora", description="What is trained: every weight, or a LoRA adapter (`lora`; a reward model's head is "
        "trained in full beside it)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps (reward, dpo; ppo, grpo and rloo run rl.iterations instead)."
    )
    micro_batch_size: int = Field(8, ge=1, description="Pairs (reward, dpo) or completions (ppo, grpo, rloo) per "
                                                       "forward.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    optimizer: Literal["adamw"] = Field("adamw", description="torch AdamW (DeepSpeed's, with deepspeed.enabled).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(20, ge=1, description="Steps (ppo, grpo, rloo: iterations) between held-out evaluations "
                                                  "(also before the first and after the last).")
    log_every: int = Field(5, ge=1, description="Steps (ppo, grpo, rloo: iterations) between progress reports "
                                                "(metrics.csv gets every one).")
    checkpoint_every: int = Field(5, ge=1, description="ppo, grpo, rloo: iterations between checkpoints (also after "
                                                       "the last), which run.resume_from continues; reward and dpo "
                                                       "write one, at the end.")
    keep_checkpoints: int = Field(2, ge=1, description="ppo, grpo, rloo: newest checkpoints kept.")
    seed: int = 0
    gradient_checkpointing: bool = False


class RewardOptions(StrictModel):
    """Reward-model training (method: reward): a scalar head on the model, Bradley-Terry loss on pairs."""

    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Pull mean rewards toward 0 (TRL's center_rewards_coefficient); null: off."
    )


def _adapter_dir(value: str | None) -> str | None:
    """A PEFT adapter directory (one with adapter_config.json), or None."""
    found = resolve_path(value) if value is not None else None
    if value is not None and (found is None or not (found / "adapter_config.json").is_file()):
        raise ValueError(f"{value!r} is not a PEFT adapter directory (no adapter_config.json)")
    return value


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
    def _adapter(cls, value: str | None) -> str | None:
        return _adapter_dir(value)


class RewardTerm(StrictModel):
    """One term of the reward: a function (built-in or `module:function`) or a trained reward model, weighted.

    A function is called as `fn(prompt, completion, reference, **args) -> float` (workloads.align.rewards). The
    recipe is checked without running it: the module's source must define the function (and a plain `def` take the
    args); it is imported only when the run starts.
    """

    function: str | None = Field(
        None, description="exact_answer (final number equals the reference's), format (an `Answer:` line), "
        "length_penalty (args: limit, in characters), or module:function on the Python path."
    )
    model: str | None = Field(
        None, description="A reward model saved by `method: reward` (<run dir>/model, or <run dir>/adapter with LoRA): "
        "it scores prompt plus completion."
    )
    weight: float = Field(1.0, description="Multiplies the term's score in the summed reward (negative: a penalty).")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the function.")

    @model_validator(mode="after")
    def _one_source(self) -> RewardTerm:
        if (self.function is None) == (self.model is None):
            raise ValueError("a reward term names exactly one of function or model")
        if self.model is not None:
            found = resolve_path(self.model)
            if found is None or not any((found / name).is_file() for name in ("config.json", "adapter_config.json")):
                raise ValueError(f"model {self.model!r} is not a saved reward model (no config.json or "
                                 "adapter_config.json)")
            if self.args:
                raise ValueError("args are for a function; a reward model takes none")
        elif (signature := check_function(str(self.function))) is not None:
            check_arguments(str(self.function), signature, self.args)  # its parameters, with the args given
        return self

    @field_validator("function")
    @classmethod
    def _imports(cls, value: str | None) -> str | None:
        if value is not None:
            check_function(value)  # a missing module or function fails here, naming this field (nothing runs)
        return value


class KlOptions(StrictModel):
    """The pull toward the reference policy (the starting policy): how KL is estimated, where it is charged, and
    whether its coefficient adapts."""

    coef: float = Field(0.05, ge=0.0, description="KL coefficient (beta), the starting value when `target` is set.")
    target: float | None = Field(
        None, gt=0.0, description="Adaptive control (Ziegler et al.): steer the mean per-sequence KL toward this; "
        "null: the coefficient stays fixed."
    )
    horizon: int = Field(10000, ge=1, description="Adaptive control: samples over which the coefficient may move by "
                                                  "20% of the KL error.")
    estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimate: k1 log-ratio (in the reward, as Ziegler et al. and OpenRLHF), "
        "k3 (q/p - 1 - log q/p, never negative: the GRPO paper's loss term)."
    )
    penalty: Literal["reward", "loss"] = Field(
        "reward", description="reward: subtract coef x KL from each token's reward (from the sequence's reward "
        "under grpo and rloo); loss: add coef x the mean token KL to the loss."
    )


class RolloutEngineConfig(EngineOptions):
    """The vLLM engines of `rl.rollout: vllm`: Ray actors beside the Train workers (each worker samples from engine
    `rank % engines`), with a serve recipe's engine knobs (workloads.serve.recipe.EngineOptions: the same fields, bounds
    and defaults); an engine's context is data.max_length, its seed train.seed, and it serves LoRA when the policy
    is a LoRA adapter."""

    engines: int = Field(1, ge=1, le=256, description="vLLM engine actors (each holds the whole policy).")
    cpus_per_engine: float = Field(1, gt=0, description="Logical CPUs per engine (per tensor-parallel shard on GPUs).")


class RlOptions(StrictModel):
    """PPO, GRPO and RLOO (method: ppo | grpo | rloo): iterations of rollout (k completions per prompt), scoring,
    advantages and several minibatch epochs of clipped policy updates. Optimizer settings are in `train`."""

    adapter: str | None = Field(
        None, description="A PEFT adapter of model.name to start from (e.g. an SFT run's <run dir>/adapter), with its "
        "own LoRA shape (the lora block is then unused); a frozen copy of it is the reference. null: a fresh LoRA "
        "(`lora`), whose reference is the base with the adapter disabled."
    )
    iterations: int = Field(20, ge=1, description="Rollout-and-update iterations.")
    prompts_per_iteration: int = Field(16, ge=1, description="Training prompts sampled per iteration.")
    group_size: int = Field(4, ge=1, description="Completions sampled per prompt (grpo, rloo: at least 2, the group "
                                                 "their advantages compare within).")
    rollout: Literal["generate", "vllm"] = Field(
        "generate", description="What samples the completions (and the held-out greedy answers): generate, the "
        "policy's own model.generate; vllm, vLLM engine actors (rl.engine), given the policy's weights after "
        "every update (a LoRA adapter under a new LoRA id, full weights reloaded in place), timed as weight_sync_s."
    )
    engine: RolloutEngineConfig = Field(default_factory=RolloutEngineConfig, description="rollout: vllm's engine.")
    max_new_tokens: int = Field(32, ge=1, description="Most tokens per completion (a longer one is cut there).")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature of rollouts (log-probs are "
                                                                 "taken at the same temperature).")
    epochs: int = Field(2, ge=1, description="Passes over each rollout batch, in minibatches of train.micro_batch_size "
                                             "x train.gradient_accumulation_steps completions.")
    clip_range: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip of the probability ratio (1 +- this).")
    entropy_coef: float = Field(0.0, ge=0.0, description="Entropy bonus: subtracts coef x mean token entropy from the "
                                                         "loss.")
    kl: KlOptions = Field(default_factory=KlOptions)
    scale_rewards: bool = Field(True, description="grpo: divide advantages by the group's reward std (false: Dr. "
                                                  "GRPO's unscaled advantages).")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="ppo: discount of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="ppo: GAE lambda (bias-variance trade-off).")
    value_clip_range: float = Field(0.2, gt=0.0, description="ppo: clip of the value update around the rollout's "
                                                             "values.")
    critic_learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="ppo: AdamW learning rate of the critic (a "
                                        "small value head on the policy's last hidden states, detached).")
    eval_prompts: int = Field(64, ge=0, description="Held-out prompts answered greedily and scored before the first "
                                                    "iteration, every train.eval_every and after the last (0: none).")

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str | None) -> str | None:
        return _adapter_dir(value)


class AlignRecipe(StrictModel):
    kind: Literal["align"] = "align"
    method: Literal[PAIR_METHODS + RL_METHODS] = Field(
        ..., description="From preference pairs: reward (a reward model), dpo (a policy trained on them directly). "
        "From prompts: ppo, grpo, rloo (a policy trained on its own completions, scored by `rewards`)."
    )
    model: ModelConfig
    data: AlignDataConfig
    train: AlignTrainConfig
    reward: RewardOptions = Field(default_factory=RewardOptions)
    dpo: DpoOptions = Field(default_factory=DpoOptions)
    rl: RlOptions = Field(default_factory=RlOptions)
    rewards: list[RewardTerm] = Field(
        default_factory=list,
        description="ppo, grpo, rloo: the reward, summed over these weighted terms (at least one)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = Field(
        default_factory=lambda: DeepSpeedConfig(enabled=False),
        description="reward, dpo: DeepSpeed through transformers' Trainer. ppo, grpo, rloo: the policy's DeepSpeed "
        "engine on each Train worker (ZeRO stage 0-2). Off (DDP) by default: on CPU, ZeRO costs more than it saves "
        "at tiny sizes.",
    )
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def output_dir(self, given: str | Path | None = None) -> Path:
        """Where a run of this recipe writes: `given` (--output-dir), else `run.output_dir`/`run.name`."""
        return self.run.directory(given)

    # Rules across fields sit on the later field, so an error names the block at fault.

    @field_validator("data")
    @classmethod
    def _data_fits_method(cls, data: AlignDataConfig, info: ValidationInfo) -> AlignDataConfig:
        method = info.data.get("method")
        if method in PAIR_METHODS and data.format != "preference":
            raise ValueError(f"data.format: {method} trains on preference pairs: format preference")
        if method in RL_METHODS and data.format == "preference":
            raise ValueError(f"data.format: {method} samples answers to prompts: a chat format with a reference answer "
                             "(alpaca, messages or sharegpt)")
        return data

    @field_validator("train")
    @classmethod
    def _length_fits_method(cls, train: AlignTrainConfig, info: ValidationInfo) -> AlignTrainConfig:
        method = info.data.get("method")
        if method in PAIR_METHODS and train.max_steps is None:
            raise ValueError(f"train.max_steps: {method} needs the number of optimizer steps")
        if method in RL_METHODS and train.max_steps is not None:
            raise ValueError(f"train.max_steps: {method} runs rl.iterations (each several optimizer steps); leave "
                             "train.max_steps out")
        if method in RL_METHODS and train.gradient_checkpointing:
            raise ValueError(f"train.gradient_checkpointing: not supported by {method} yet")
        return train

    @field_validator("dpo")
    @classmethod
    def _adapter_continues_lora(cls, dpo: DpoOptions, info: ValidationInfo) -> DpoOptions:
        train = info.data.get("train")
        if dpo.adapter is not None and (info.data.get("method") != "dpo" or getattr(train, "method", None) != "lora"):
            raise ValueError("dpo.adapter continues a LoRA policy: it needs method: dpo and train.method: lora")
        return dpo

    @field_validator("rl")
    @classmethod
    def _rl_fits_method(cls, rl: RlOptions, info: ValidationInfo) -> RlOptions:
        method, train = info.data.get("method"), info.data.get("train")
        if rl.adapter is not None and (method not in RL_METHODS or getattr(train, "method", None) != "lora"):
            raise ValueError(f"rl.adapter continues a LoRA policy: it needs method: {_either(RL_METHODS)} and "
                             "train.method: lora")
        max_length = getattr(info.data.get("data"), "max_length", None)
        if method in RL_METHODS and max_length is not None and rl.max_new_tokens >= max_length:
            raise ValueError(f"rl.max_new_tokens ({rl.max_new_tokens}) leaves no room for a prompt within "
                             f"data.max_length ({max_length})")
        if method in GROUP_METHODS and rl.group_size < 2:
            raise ValueError(f"rl.group_size: {method} {GROUP_METHODS[method]}: at least 2")
        return rl

    @field_validator("rewards")
    @classmethod
    def _rewards_fit_method(cls, rewards: list[RewardTerm], info: ValidationInfo) -> list[RewardTerm]:
        method = info.data.get("method")
        if method in RL_METHODS and not rewards:
            raise ValueError(f"{method} needs at least one reward term (e.g. [{{function: exact_answer}}])")
        if method in PAIR_METHODS and rewards:
            raise ValueError(f"{method} learns from preference pairs: rewards are for {_either(RL_METHODS)}")
        names = [term_name(term) for term in rewards]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"each term once: {', '.join(twice)} appears twice")
        return rewards

    @field_validator("lora")
    @classmethod
    def _engine_serves_the_lora(cls, lora: LoraConfig, info: ValidationInfo) -> LoraConfig:
        rl, train = info.data.get("rl"), info.data.get("train")
        fresh = (info.data.get("method") in RL_METHODS and getattr(train, "method", None) == "lora"
                 and getattr(rl, "rollout", None) == "vllm" and rl.adapter is None)
        unservable = [f"lora.{name}" for name in ("use_dora", "modules_to_save") if getattr(lora, name)]
        if fresh and unservable:
            raise ValueError(f"{' and '.join(unservable)}: vLLM cannot serve such an adapter to rl.rollout: vllm "
                             "(use rl.rollout: generate)")
        return lora

    @field_validator("deepspeed")
    @classmethod
    def _rl_zero_stage(cls, deepspeed: DeepSpeedConfig, info: ValidationInfo) -> DeepSpeedConfig:
        if info.data.get("method") in RL_METHODS and deepspeed.enabled and deepspeed.stage == 3:
            raise ValueError(f"deepspeed.stage: {info.data.get('method')} runs ZeRO stages 0, 1 or 2 (each worker "
                             "holds the whole policy to sample and sync it); stage 3 is not supported yet")
        return deepspeed

    @field_validator("scaling")
    @classmethod
    def _float16_on_gpu(cls, scaling: ScalingConfig, info: ValidationInfo) -> ScalingConfig:
        if getattr(info.data.get("model"), "dtype", None) == "float16" and not scaling.use_gpu:
            raise ValueError("model.dtype float16 needs GPUs (scaling.use_gpu: true); use float32 on CPU")
        rl = info.data.get("rl")
        if info.data.get("method") in RL_METHODS and rl is not None:
            if rl.prompts_per_iteration % scaling.num_workers:
                raise ValueError(f"scaling.num_workers: each worker takes an equal share of rl.prompts_per_iteration "
                                 f"({rl.prompts_per_iteration}): a divisor of it")
            if rl.engine.tensor_parallel_size > 1 and not scaling.use_gpu:
                raise ValueError("rl.engine.tensor_parallel_size: shards an engine over GPUs (scaling.use_gpu: "
                                 "true); on CPU it is 1")
        return scaling

    @field_validator("run")
    @classmethod
    def _run_options(cls, run: RunConfig, info: ValidationInfo) -> RunConfig:
        method = info.data.get("method")
        if run.resume_from is not None and method not in RL_METHODS:
            raise ValueError(f"run.resume_from: {method} runs do not resume yet (a failed worker group restarts the "
                             "run from its first step, up to run.max_failures times)")
        if method in RL_METHODS and run.storage_path is not None and "://" in run.storage_path:
            raise ValueError(f"run.storage_path: {method} writes its checkpoints to a local directory (no URI yet)")
        lora_policy = (method in ("dpo", *RL_METHODS)
                       and getattr(info.data.get("train"), "method", None) == "lora")
        if run.merge_adapter and not lora_policy:
            raise ValueError("run.merge_adapter merges a LoRA policy into its base: it needs method: "
                             f"{_either(('dpo', *RL_METHODS))} and train.method: lora")
        return run


