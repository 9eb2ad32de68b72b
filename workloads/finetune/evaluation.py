"""Evaluation during fine-tuning and what it decides: eval loss, perplexity, a generation score; early
stopping and the best step.

Every rank runs the same evaluation on its share of the eval set and the results are summed over ranks,
so every rank reaches the same decision (stop, new best) without exchanging anything else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from workloads.common.collectives import sum_across
from workloads.data.formats import eval_records, record_tools, to_messages
from workloads.finetune.recipe import EVAL_METRIC_MODES, EvalConfig, FinetuneRecipe
from workloads.finetune.strategy import Strategy
from workloads.scoring import build_scorer


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf where that overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class GenerationCase:
    """A chat prompt, tokenized with the generation prompt appended, and the reply it should get."""

    prompt_ids: list[int]
    reference: str


def generation_cases(recipe: FinetuneRecipe, tokenizer, records: Iterable[tuple[str, dict]] | None = None
                     ) -> list[GenerationCase]:
    """The first `eval.generate_samples` eval records (datasets in order) that end in an assistant reply, the
    reference. Raw text records and prompts of data.max_length tokens or more (never seen whole) are left out.
    `records`: (format, record) of the eval sets, read no further than needed; default: `eval_records`.
    """
    cases: list[GenerationCase] = []
    for fmt, record in records if records is not None else eval_records(recipe.data, recipe.train.seed):
        messages = [] if fmt == "text" else to_messages(record, fmt, recipe.data.system_prompt)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            continue
        text = tokenizer.apply_chat_template(messages[:-1], tools=record_tools(record, fmt), tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < recipe.data.max_length:
            cases.append(GenerationCase(ids, messages[-1]["content"]))
        if len(cases) == recipe.eval.generate_samples:
            break
    if not cases:
        raise ValueError(f"eval.generate: no eval example has a prompt shorter than data.max_length "
                         f"({recipe.data.max_length} tokens) and a reply to score")
    return cases


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def _stop_ids(model, tokenizer) -> list[int]:
    """The model's own end tokens (e.g. Llama 3's end-of-turn) and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    return sorted(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


@torch.no_grad()
def generation_score(model, tokenizer, cases: list[GenerationCase], cfg: EvalConfig, *, rank: int = 0,
                     world_size: int = 1, batch_size: int = 8, device: torch.device | None = None,
                     synced: bool = False) -> float:
    """Share of `cases` whose greedy reply `cfg.scorer` accepts; each rank replies to its share, counts are summed.

    `synced`: ranks step generation together (ZeRO-3 gathers the weights in every forward), so every rank makes
    the same number of `generate` calls, padding its share with uncounted repeats.
    """
    share = -(-len(cases) // world_size)
    mine = cases[rank::world_size]
    counted = len(mine)
    mine = mine + [cases[0]] * (share - counted)
    scorer, stop = build_scorer({"type": cfg.scorer}), _stop_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, share, batch_size):
        batch = mine[start : start + batch_size]
        ids, mask = _left_pad([c.prompt_ids for c in batch], tokenizer.pad_token_id)
        out = model.generate(input_ids=ids.to(device or ids.device), attention_mask=mask.to(device or ids.device),
                             max_new_tokens=cfg.max_new_tokens, do_sample=False, synced_gpus=synced,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        replies = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        right += sum(scorer.score(reply, case.reference)
                     for i, (reply, case) in enumerate(zip(replies, batch, strict=True)) if start + i < counted)
    model.train(was_training)
    right_sum, counted_sum = sum_across([right, counted])
    return right_sum / counted_sum if counted_sum else math.nan


class Evaluator:
    """One evaluation as the recipe asks: eval loss and perplexity and, with eval.generate, eval_exact_match."""

    def __init__(self, recipe: FinetuneRecipe, tokenizer, batches: list[dict[str, torch.Tensor]],
                 cases: list[GenerationCase], rank: int, world_size: int, device: torch.device):
        """`cases`: the eval set's `generation_cases`, with eval.generate (made once, on the driver)."""
        self.cfg, self.tokenizer, self.batches = recipe.eval, tokenizer, batches
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batch_size = recipe.train.micro_batch_size
        self.cases = cases if recipe.eval.generate and batches else []

    def __call__(self, strategy: Strategy) -> dict[str, float | None]:
        if not self.batches:
            return {"eval_loss": None}
        loss = strategy.eval_loss(self.batches)
        metrics: dict[str, float | None] = {"eval_loss": loss, "eval_perplexity": perplexity(loss)}
        if self.cases:
            metrics["eval_exact_match"] = generation_score(
                strategy.module, self.tokenizer, self.cases, self.cfg, rank=self.rank, world_size=self.world_size,
                batch_size=self.batch_size, device=self.device, synced=strategy.zero3 and self.world_size > 1)
        return metrics


@dataclass
class EarlyStopping:
    """Follows one eval metric: its best value and step so far, and the evaluations since it last improved.

    A new best is any strictly better value; only an improvement by more than `min_delta` resets the patience
    count (as Hugging Face's EarlyStoppingCallback). `improvements` numbers the bests, so the checkpoint with
    the highest number is the best one (Ray Train keeps checkpoints by it).
    """

    metric: str
    mode: str
    patience: int | None = None
    min_delta: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    improvements: int = 0
    stale_evals: int = 0

    @classmethod
    def from_config(cls, cfg: EvalConfig, saved: dict | None = None) -> EarlyStopping:
        """Start fresh, or continue `saved` (a `state()`) when it followed the same metric."""
        stopper = cls(cfg.metric, EVAL_METRIC_MODES[cfg.metric], cfg.early_stopping_patience, cfg.min_delta)
        if saved and saved.get("metric") == cfg.metric:
            for key in ("best_value", "best_step", "improvements", "stale_evals"):
                setattr(stopper, key, saved[key])
        return stopper

    def _gain(self, value: float) -> float:
        """How much better `value` is than the best so far (inf when there is none yet)."""
        if self.best_value is None:
            return math.inf
        return self.best_value - value if self.mode == "min" else value - self.best_value

    def update(self, step: int, value: float | None) -> bool:
        """Record the metric at an evaluation of `step`; True when it is a new best."""
        if value is None or math.isnan(value):
            self.stale_evals += 1
            return False
        gain = self._gain(value)
        self.stale_evals = 0 if gain > self.min_delta else self.stale_evals + 1
        if gain <= 0:
            return False
        self.best_value, self.best_step, self.improvements = value, step, self.improvements + 1
        return True

    @property
    def should_stop(self) -> bool:
        """Patience is used up: `patience` evaluations in a row brought no improvement beyond min_delta."""
        return self.patience is not None and self.stale_evals >= self.patience

    def state(self) -> dict:
        """What a checkpoint keeps, so a restarted run goes on counting."""
        return asdict(self)
