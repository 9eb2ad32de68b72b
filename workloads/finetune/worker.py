"""What each Ray Train worker of a fine-tuning run executes: `train_worker` (set up the model and data, the training
loop with evaluation, checkpoints and tracking). Plain PyTorch between its calls to `cluster.train`."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from cluster import data as cluster_data
from cluster import train as cluster_train
from workloads.common import reporting, tracking
from workloads.common.collectives import sum_across
from workloads.common.paths import PATHS_CHECKED
from workloads.data.formats import collate, count_tokens
from workloads.finetune import schedule
from workloads.finetune.evaluation import EarlyStopping, Evaluator
from workloads.finetune.recipe import FinetuneRecipe
from workloads.finetune.strategy import Strategy, weights_dtype
from workloads.models.loading import load_model, load_tokenizer
from workloads.models.lora import attach_lora

TRAINER_STATE = "trainer_state.json"
# With eval.keep_best, reported with every checkpoint: k on the k-th new best, else 0. Ray Train keeps the highest.
BEST_RANK = "best_rank"


class StepBatches:
    """The micro-batches of any optimizer step, computed from the step alone, so resume can skip ahead."""

    def __init__(self, examples: list[dict], recipe: FinetuneRecipe, rank: int, world_size: int, pad_id: int):
        self.examples, self.rank, self.world_size, self.pad_id = examples, rank, world_size, pad_id
        self.micro, self.accum, self.seed = (
            recipe.train.micro_batch_size, recipe.train.gradient_accumulation_steps, recipe.train.seed
        )
        self.steps_per_epoch = schedule.steps_per_epoch(len(examples), self.micro, self.accum, world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: {len(examples)} examples cannot fill one step of {world_size} workers x "
                f"{self.micro} x {self.accum} accumulation"
            )

    def for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        mine = order[self.rank :: self.world_size].tolist()
        size = self.micro * self.accum
        chunk = mine[index * size : (index + 1) * size]
        return [
            collate([self.examples[i] for i in chunk[k : k + self.micro]], self.pad_id)
            for k in range(0, size, self.micro)
        ]


class StreamedSteps:
    """The micro-batches of each optimizer step from this worker's shard of the streamed data (`data.streaming`),
    pass after pass. A pass's last examples that fill no whole step are skipped, as `StepBatches` skips them."""

    def __init__(self, recipe: FinetuneRecipe, pad_id: int, steps_per_epoch: int | None):
        """`steps_per_epoch`: counted by the driver (num_epochs), else learned at the end of the first pass."""
        self.pad_id, self.steps_per_epoch, self.streaming = pad_id, steps_per_epoch, recipe.data.streaming
        self.micro, self.accum, self.seed = (
            recipe.train.micro_batch_size, recipe.train.gradient_accumulation_steps, recipe.train.seed
        )

    def after(self, step: int, steps_per_epoch: int | None = None) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Steps `step + 1`, `step + 2`, ...: exactly the steps an uninterrupted run makes there. A resumed run
        streams its epoch again from the start and skips the steps it has made (their examples are read, not trained
        on): a pass holds the same examples in the same order every time (files in seeded order, an ordered split
        across workers, each pass's local shuffle seeded with train.seed + its epoch). `steps_per_epoch`: as a
        checkpoint recorded it, when the driver did not count it (else a resume past the first pass reads from the
        first pass on)."""
        self.steps_per_epoch = self.steps_per_epoch or steps_per_epoch
        return self._steps(step)

    def _steps(self, step: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        epoch = step // self.steps_per_epoch if self.steps_per_epoch else 0
        while True:
            first, made, group = epoch * (self.steps_per_epoch or 0), 0, []  # the pass's steps: first + 1, ...
            for rows in cluster_data.shard_batches("train", self.micro, shuffle_seed=self.seed + epoch,
                                                   shuffle_buffer_rows=self.streaming.shuffle_buffer_rows):
                group.append(rows)
                if len(group) < self.accum:
                    continue
                made += 1
                if first + made > step:
                    yield [collate(micro, self.pad_id) for micro in group]
                group = []
            if made == 0:
                raise ValueError(f"data: a pass over this worker's shard fills no optimizer step of micro_batch_size "
                                 f"{self.micro} x gradient_accumulation_steps {self.accum}")
            self.steps_per_epoch = self.steps_per_epoch or made
            epoch += 1


class StreamedEval:
    """This worker's shard of the streamed eval set, batched; read again at every evaluation."""

    def __init__(self, recipe: FinetuneRecipe, pad_id: int):
        self.micro, self.pad_id = recipe.train.micro_batch_size, pad_id

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in cluster_data.shard_batches("eval", self.micro, drop_last=False):
            yield collate(rows, self.pad_id)


def eval_batches(examples: list[dict], recipe: FinetuneRecipe, rank: int, world_size: int, pad_id: int):
    """This rank's share of the eval set, batched; every rank gets the same number of batches."""
    if not examples:
        return []
    per_rank = -(-len(examples) // world_size)
    padded = (examples * world_size)[: per_rank * world_size]
    mine = padded[rank * per_rank : (rank + 1) * per_rank]
    size = recipe.train.micro_batch_size
    return [collate(mine[i : i + size], pad_id) for i in range(0, len(mine), size)]


def _setup_model(recipe: FinetuneRecipe, model_path: str, device: torch.device):
    method = recipe.train.method
    quant = recipe.quantization if method == "qlora" else None
    model = load_model(model_path, dtype=weights_dtype(recipe), quantization=quant, device=device,
                       revision=recipe.model.revision, attn_implementation=recipe.model.attn_implementation)
    if recipe.train.gradient_checkpointing and method != "qlora":
        model.gradient_checkpointing_enable()
    if method in ("lora", "qlora"):
        model = attach_lora(model, recipe.lora, quantized=method == "qlora",
                            gradient_checkpointing=recipe.train.gradient_checkpointing)
    return model


def _restore(strategy: Strategy, resume_from: str | None, fit_id: str | None = None) -> dict:
    """Load the newest checkpoint of this run (after a worker failure, or `resume_from: latest`) or
    `resume_from`, if any. A Ray checkpoint written by this same fit (`fit_id`) means a restart after a failure."""
    with cluster_train.latest_checkpoint() as ray_checkpoint:
        source = ray_checkpoint or (Path(resume_from) if resume_from else None)
        if source is None:
            return {"step": 0, "history": [], "restarts": [], "fit_id": fit_id}
        strategy.load(source)
        state = json.loads((source / TRAINER_STATE).read_text())
    failure = ray_checkpoint is not None and state.get("fit_id") == fit_id
    state["restarts"].append({"from_step": state["step"], "via": "failure" if failure else "resume_from"})
    state["fit_id"] = fit_id
    if ray_checkpoint is None:  # a checkpoint from elsewhere: its best step and tracker runs are not this run's
        state.pop("early_stopping", None)
        state.pop("tracking", None)
    return state


def _save_checkpoint(strategy: Strategy, state: dict, metrics: dict, rank: int, tokenizer, trainable_only: bool,
                     export: bool):
    """Every rank writes its shard; rank 0 adds the trainer state (and, with `export`, the HF model); report.

    Only the last checkpoint (and, with eval.keep_best, each new best) carries the HF export: for a full 8B
    model that is 16 GB, and resuming needs only the training state.
    """
    with tempfile.TemporaryDirectory(prefix="llmc-ckpt-") as tmp:
        path = Path(tmp)
        strategy.save(path, rank, trainable_only)
        if export:
            strategy.export(path / "model", rank, tokenizer)
        if rank == 0:
            (path / TRAINER_STATE).write_text(json.dumps(state))
        cluster_train.report(metrics, path if any(path.iterdir()) else None)


def train_worker(config: dict) -> None:
    """One Ray Train worker: setup, train loop, checkpoints. Rank 0 prints, keeps the history, logs to trackers."""
    recipe = FinetuneRecipe.model_validate(config["recipe"], context=PATHS_CHECKED)  # its data came with `config`
    train = recipe.train
    rank, local_rank, world_size = cluster_train.world()
    torch.set_num_threads(recipe.scaling.cpus_per_worker)
    torch.manual_seed(train.seed)
    device = torch.device(f"cuda:{local_rank}") if recipe.scaling.use_gpu else torch.device("cpu")

    # Setup: the data the driver tokenized once for every worker (`prepare`), or this worker's streamed shard of it
    # (data.streaming), then the model.
    tokenizer = load_tokenizer(config["model_path"], recipe.model.revision, recipe.model.chat_template)
    train_ex, eval_ex, cases = config["data"]
    if recipe.data.streaming.enabled:
        batches = StreamedSteps(recipe, tokenizer.pad_token_id, config["streamed"]["steps_per_epoch"])
        evals = StreamedEval(recipe, tokenizer.pad_token_id) if config["streamed"]["eval"] else []
    else:
        batches = StepBatches(train_ex, recipe, rank, world_size, tokenizer.pad_token_id)
        evals = eval_batches(eval_ex, recipe, rank, world_size, tokenizer.pad_token_id)
    total = schedule.total_steps(train, batches.steps_per_epoch or 0)  # the run's length: max_steps or num_epochs
    evaluate = Evaluator(recipe, tokenizer, evals, cases, rank, world_size, device)
    strategy = Strategy(_setup_model(recipe, config["model_path"], device), recipe, world_size, device, total)
    state = _restore(strategy, config.get("resume_from"), config.get("fit_id"))
    steps = batches.after(state["step"], state.get("steps_per_epoch")) if recipe.data.streaming.enabled else None
    state.update(total_steps=total, steps_per_epoch=batches.steps_per_epoch)
    if state["step"] == 0 and evals:
        state["initial_eval"] = evaluate(strategy)
        state["initial_eval_loss"] = state["initial_eval"]["eval_loss"]
    stopper = EarlyStopping.from_config(recipe.eval, state.get("early_stopping"))
    trainable_only, keep_best = train.method != "full", recipe.eval.keep_best

    # Loop: one optimizer step per iteration; metrics summed over ranks; evaluation may end it early.
    with _tracker(recipe, config, state, rank) as tracker:
        for step in range(state["step"] + 1, total + 1):
            started = time.perf_counter()
            micro_batches = next(steps) if steps is not None else batches.for_step(step - 1)
            loss, grad_norm = strategy.train_step(micro_batches)
            tokens = sum(count_tokens(b) for b in micro_batches)
            loss_sum, token_sum = sum_across([loss, tokens])
            seconds = time.perf_counter() - started
            per_epoch = batches.steps_per_epoch  # streamed with max_steps: known once a pass has ended
            row = {"step": step, "epoch": round(step / per_epoch, 4) if per_epoch else None,
                   "loss": loss_sum / world_size,
                   "lr": strategy.lr(), "grad_norm": grad_norm, "tokens": int(token_sum), "step_seconds": seconds,
                   "tokens_per_second": token_sum / seconds}
            evaluated = step % train.eval_every == 0 or step == total
            if evaluated:  # every rank gets the same summed metrics, so all decide alike
                row.update(evaluate(strategy))
            new_best = evaluated and stopper.update(step, row.get(recipe.eval.metric))
            last = step == total or (evaluated and stopper.should_stop)
            state["history"].append(row)
            state.update(step=step, early_stopping=stopper.state(), steps_per_epoch=batches.steps_per_epoch)
            if rank == 0:  # the dashboard's and `llmc status`'s view of the run (llmc_train_* gauges), the trackers
                cluster_train.publish({**row, "restarts": sum(r["via"] == "failure" for r in state["restarts"])})
                tracker.log_metrics(row, step)
            if rank == 0 and (step % train.log_every == 0 or last or evaluated):
                print(reporting.progress_line(row, total), flush=True)
            if step % train.checkpoint_every == 0 or last or (keep_best and new_best):
                scored = {**row, BEST_RANK: stopper.improvements if new_best else 0} if keep_best else row
                _save_checkpoint(strategy, state, scored, rank, tokenizer, trainable_only,
                                 export=last or (keep_best and new_best))
            elif step % train.log_every == 0 or evaluated:
                cluster_train.report(row)
            if last:
                break


def _tracker(recipe: FinetuneRecipe, config: dict, state: dict, rank: int) -> tracking.Tracker:
    """Rank 0's trackers (a restarted run's reopened), with the recipe and the initial eval logged; else none."""
    if rank != 0 or not recipe.tracking.backends:
        return tracking.Tracker()
    tracker = tracking.open_tracker(recipe.tracking, Path(config["tracking_dir"]), recipe.run.name,
                                    start_step=state["step"], resume_ids=state.get("tracking"))
    state["tracking"] = tracker.ids
    tracker.log_params(config["recipe"])
    if state["step"] == 0 and state.get("initial_eval"):
        tracker.log_metrics(state["initial_eval"], 0)
    return tracker
