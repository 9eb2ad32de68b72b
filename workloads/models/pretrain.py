"""Pretraining the tiny model on generated addition chats, and measuring the skill it ends with.

One process, a fixed number of AdamW steps in a seeded order on a fixed number of threads: the same config
gives the same weights. The corpus is every pair of 0..99 in the pretraining phrasing except the bundled
task's held-out test pairs, so the skill is measured on pairs the model never saw, in both phrasings.
"""

from __future__ import annotations

import random
import sys
import time

import torch

from workloads.bundled import make_arithmetic as arithmetic
from workloads.data.formats import collate, tokenize_chat
from workloads.models.recipe import TinyModelConfig
from workloads.scoring.answers import final_number

MAX_LENGTH = 64  # a pretraining conversation is about 30 tokens


def corpus() -> list[list[dict]]:
    """The pretraining conversations: all pairs but the held-out test pairs, in the model's own phrasing."""
    _train, test = arithmetic.split_pairs()
    return arithmetic.pretraining_conversations(exclude=set(test))


def pretrain(model, tokenizer, cfg: TinyModelConfig) -> dict:
    """Train `model` in place for `cfg.pretrain_steps` steps (assistant tokens only); returns loss and time."""
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    examples = [tokenize_chat(messages, tokenizer, MAX_LENGTH) for messages in corpus()]
    rng = random.Random(cfg.seed)
    order: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.pretrain_threads)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_learning_rate, weight_decay=0.0, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.pretrain_warmup_steps, cfg.pretrain_steps)
    bar = tqdm(total=cfg.pretrain_steps, desc="pretraining the tiny model", unit="step", file=sys.stderr,
               mininterval=1.0, dynamic_ncols=True)
    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    model.train()
    try:
        for step in range(cfg.pretrain_steps):
            if len(order) < cfg.pretrain_batch_size:  # a fresh shuffled pass over the corpus
                order += rng.sample(range(len(examples)), len(examples))
            batch = collate([examples[i] for i in order[: cfg.pretrain_batch_size]], tokenizer.pad_token_id)
            del order[: cfg.pretrain_batch_size]
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == cfg.pretrain_steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    finally:
        bar.close()
        torch.set_num_threads(threads)
    model.eval()
    return {"steps": cfg.pretrain_steps, "batch_size": cfg.pretrain_batch_size, "final_loss": round(loss.item(), 4),
            "seconds": round(time.perf_counter() - started, 1), "corpus_conversations": len(examples)}


@torch.no_grad()
def greedy_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 24,
                   batch_size: int = 100) -> list[str]:
    """Greedy replies of a transformers model to chat prompts (the prompt's messages, no assistant turn)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    replies = []
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [r.strip() for r in replies]


def held_out_accuracy(model, tokenizer, phrasing: str, n: int | None = None) -> dict:
    """Share of held-out test pairs whose greedy answer ends with the sum, in `phrasing` ("own" or "task")."""
    prompt = {"own": arithmetic.pretraining_prompt, "task": arithmetic.task_prompt}[phrasing]
    pairs = arithmetic.split_pairs()[1][:n]
    replies = greedy_answers(model, tokenizer, [prompt(a, b) for a, b in pairs])
    correct = sum(final_number(r) == a + b for r, (a, b) in zip(replies, pairs, strict=True))
    return {"correct": correct, "questions": len(pairs), "accuracy": round(correct / len(pairs), 3),
            "example": {"prompt": prompt(*pairs[0])[-1]["content"], "reply": replies[0]}}


def skill_card(model, tokenizer, training: dict) -> dict:
    """What the pretrained model can do, measured on the held-out pairs in both phrasings."""
    return {
        "skill": "two-number addition, a and b in 0..99; scored by the reply's final number",
        "held_out_own_phrasing": held_out_accuracy(model, tokenizer, "own"),
        "held_out_bundled_task": held_out_accuracy(model, tokenizer, "task"),
        "pretraining": training,
    }
