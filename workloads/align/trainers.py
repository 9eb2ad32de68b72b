"""What each Ray Train worker runs for `llmc align`: TRL's RewardTrainer or DPOTrainer on the preference pairs.

transformers' Trainer (under TRL) finds the process group Ray Train set up (RANK, WORLD_SIZE, gloo or NCCL) and
runs DDP, or DeepSpeed from the same config finetune uses. A callback keeps every step's metrics (the same on
every rank: Trainer reduces them), reports progress to the driver, and the run ends with one checkpoint: the
exported model or adapter plus the history, from which the driver writes summary.json, metrics.csv and plots.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from cluster import train as cluster_train
from workloads.align.recipe import SCHEDULERS, AlignRecipe
from workloads.common.collectives import gather
from workloads.common.paths import PATHS_CHECKED
from workloads.finetune.plan import deepspeed_config
from workloads.models.loading import load_model, load_tokenizer
from workloads.models.lora import peft_lora_config

STATE = "align_state.json"  # beside the exported model in the final checkpoint: history and evaluations
MODEL_DIR = "model"


def metric_name(key: str) -> str:
    """TRL's metric keys as CSV/JSON-friendly names: `eval_rewards/margins` -> `eval_rewards_margins`."""
    return key.replace("/", "_")


class History(TrainerCallback):
    """Every optimizer step's metrics as one row (eval metrics joined to their step); progress to the driver."""

    def __init__(self, log_every: int):
        self.log_every, self.rows, self.evals = log_every, [], []
        self._started = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {metric_name(k): v for k, v in (logs or {}).items() if isinstance(v, int | float)}
        if "eval_loss" in logs:
            self.evals.append({"step": state.global_step, **logs})
            if self.rows and self.rows[-1]["step"] == state.global_step:
                self.rows[-1].update(logs)
        elif "loss" in logs:
            row = {"step": state.global_step, "loss": logs.pop("loss"), "lr": logs.pop("learning_rate", None),
                   "step_seconds": time.perf_counter() - self._started, **logs}
            self.rows.append(row)
            if state.global_step % self.log_every == 0:  # a barrier across workers: every rank logs alike
                cluster_train.report(row)


def training_args(recipe: AlignRecipe, out_dir: str, world_size: int) -> dict:
    """transformers TrainingArguments shared by both trainers, from the recipe (DeepSpeed from `plan`)."""
    t = recipe.train
    return dict(
        output_dir=out_dir, max_steps=t.max_steps, per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1], adam_epsilon=t.adam_eps, max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps, lr_scheduler_type=SCHEDULERS[t.lr_scheduler], seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing, max_length=recipe.data.max_length,
        logging_steps=1, eval_strategy="steps", eval_steps=t.eval_every, eval_on_start=True, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=not recipe.scaling.use_gpu,
        bf16=recipe.model.dtype == "bfloat16", fp16=recipe.model.dtype == "float16",
        # deepspeed_config reads the same field names from the align recipe as from a finetune one.
        deepspeed=deepspeed_config(recipe, world_size) if recipe.deepspeed.enabled else None,  # type: ignore[arg-type]
    )


def reward_trainer(recipe: AlignRecipe, model_path: str, tokenizer, train, held_out, args: dict, callbacks):
    """TRL's RewardTrainer: the model with a one-output head, LoRA keeping the head trainable."""
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(**args, center_rewards_coefficient=recipe.reward.center_rewards_coefficient,
                          model_init_kwargs={"dtype": recipe.model.dtype, "revision": recipe.model.revision})
    peft = peft_lora_config(recipe.lora, "SEQ_CLS", ("score",)) if recipe.train.method == "lora" else None
    return _keeping_shards(RewardTrainer)(model=model_path, args=config, train_dataset=train, eval_dataset=held_out,
                                          processing_class=tokenizer, peft_config=peft, callbacks=callbacks)


def dpo_trainer(recipe: AlignRecipe, model_path: str, tokenizer, train, held_out, args: dict, callbacks):
    """TRL's DPOTrainer on a LoRA policy (fresh, or `dpo.adapter` continued) or the full model."""
    from trl import DPOConfig, DPOTrainer

    model = load_model(model_path, dtype=recipe.model.dtype, revision=recipe.model.revision,
                       attn_implementation=recipe.model.attn_implementation)
    peft = None
    if recipe.dpo.adapter is not None:  # TRL copies it as a frozen "ref" adapter: the reference is the start
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, recipe.dpo.adapter, is_trainable=True)
    elif recipe.train.method == "lora":  # the reference is the base with the adapter disabled
        peft = peft_lora_config(recipe.lora)
    config = DPOConfig(**args, beta=recipe.dpo.beta, loss_type=[recipe.dpo.loss_type])
    return _keeping_shards(DPOTrainer)(model=model, args=config, train_dataset=train, eval_dataset=held_out,
                                       processing_class=tokenizer, peft_config=peft, callbacks=callbacks)


def _keeping_shards(trainer_class: type) -> type:
    """`trainer_class` training on this worker's own pairs only: the driver dealt each worker its shard
    (`preference.deal`, equal lengths), so the batch sampler accelerate wraps around the loader must not split it
    across the workers again (as transformers does for its own rank-aware samplers)."""
    from accelerate.data_loader import BatchSamplerShard

    class OwnShard(trainer_class):
        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            if isinstance(sampler := getattr(loader, "batch_sampler", None), BatchSamplerShard):
                sampler.num_processes, sampler.process_index = 1, 0
            return loader

    OwnShard.__name__ = trainer_class.__name__
    return OwnShard


def _shards(trainer, pairs: list[dict]) -> dict:
    """What the workers train on, gathered from all: the batches each one's loader gives per pass, and how many
    distinct pairs there are in all shards together (every training pair once, when the shards are disjoint)."""
    digests = {hashlib.sha256(json.dumps(pair, sort_keys=True).encode()).hexdigest() for pair in pairs}
    shards = gather({"batches": len(trainer.get_train_dataloader()), "pairs": len(pairs), "digests": digests})
    return {"train_pairs": len(set().union(*(shard["digests"] for shard in shards))),
            "pairs_per_worker": [shard["pairs"] for shard in shards],
            "batches_per_worker": [shard["batches"] for shard in shards]}


def train_worker(config: dict) -> None:
    """One Ray Train worker: data, trainer, train, a last evaluation, then the export in one checkpoint."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    recipe = AlignRecipe.model_validate(config["recipe"], context=PATHS_CHECKED)  # its pairs came with `config`
    _, _, world_size = cluster_train.world()
    torch.set_num_threads(recipe.scaling.cpus_per_worker)
    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(config["model_path"], recipe.model.revision, recipe.model.chat_template)
    # As the driver read and checked them: this worker's shard of the training pairs, every held-out pair (evaluation
    # splits those across the workers itself).
    train, held_out = config["train_pairs"], config["held_out_pairs"]
    history = History(recipe.train.log_every)
    build = reward_trainer if recipe.method == "reward" else dpo_trainer
    with tempfile.TemporaryDirectory(prefix="llmc-align-") as scratch:
        trainer = build(recipe, config["model_path"], tokenizer, datasets.Dataset.from_list(train),
                        datasets.Dataset.from_list(held_out), training_args(recipe, scratch, world_size), [history])
        trainer.remove_callback(PrinterCallback)  # rows go to metrics.csv, progress to the driver
        shards = _shards(trainer, train)
        trainer.train()
        if history.evals[-1]["step"] != recipe.train.max_steps:
            trainer.evaluate()
        save_and_report(trainer, recipe, history, {"held_out_pairs": len(held_out), "workers": world_size, **shards},
                        held_out)


def save_and_report(trainer, recipe: AlignRecipe, history: History, facts: dict, held_out: list[dict]) -> None:
    """The run's one checkpoint: the exported model or adapter and the history (rank 0's), reported by every rank."""
    rank, local_rank, _ = cluster_train.world()
    with tempfile.TemporaryDirectory(prefix="llmc-align-ckpt-") as tmp:
        out = Path(tmp)
        trainer.save_model(str(out / MODEL_DIR))  # every rank calls it (DeepSpeed gathers); rank 0 writes
        if rank == 0:
            shutil.rmtree(out / MODEL_DIR / "ref", ignore_errors=True)  # DPO's frozen copy of a start adapter
            (out / MODEL_DIR / "training_args.bin").unlink(missing_ok=True)  # a pickle: not in a served model
            state = {"history": history.rows, "evals": history.evals, "train": train_summary(trainer), **facts}
            if recipe.method == "reward":
                device = f"cuda:{local_rank}" if recipe.scaling.use_gpu else "cpu"
                state["heldout_pairwise_accuracy"] = heldout_accuracy(out / MODEL_DIR, held_out, recipe, device)
            (out / STATE).write_text(json.dumps(state))
        cluster_train.report({**history.rows[-1], **history.evals[-1]}, out if rank == 0 else None)


def train_summary(trainer) -> dict:
    """Trainer's own end-of-run numbers (runtime, mean loss), from its log history."""
    last = next((e for e in reversed(trainer.state.log_history) if "train_runtime" in e), {})
    return {key: last[key] for key in ("train_runtime", "train_loss", "train_samples_per_second") if key in last}


def heldout_accuracy(model_dir: Path, held_out: list[dict], recipe: AlignRecipe, device: str) -> float:
    """Pairwise accuracy of the saved reward model on every held-out pair, scored the way PPO/GRPO will load it."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from workloads.align.reward import load_reward_model, pairwise_accuracy

    unset_hf_deepspeed_config()  # training is over: load the model whole, not ZeRO-3-partitioned as Trainer set up
    return pairwise_accuracy(load_reward_model(model_dir, device=device, dtype=recipe.model.dtype), held_out)
