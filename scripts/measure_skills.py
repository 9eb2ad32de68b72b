"""Measure a real model's skills on the bundled tasks' held-out split and write its skill card.

    python scripts/measure_skills.py [--model smollm2-135m] [--items 100]

For each task, a weak and a strong prompt variant (zero-shot against few-shot, a one-word answer against a free
one, ...) answer the first `--items` test cases greedily with plain transformers in this process, and each answer is
scored by its task's scorer from the registry (json_match, choice, numeric). The card goes to
workloads/bundled/skill_cards/<model>.json, where `read_skill_card` finds it for the converted model, and a Markdown
table beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from workloads.bundled.make_tasks import task_path  # noqa: E402
from workloads.models.gguf import SKILL_CARDS  # noqa: E402

# Each variant: (name, how the case is asked, demonstrations from train, max new tokens).
VARIANTS = {
    "json_extraction": [("zero-shot", "instruction", 0, 32), ("1-shot", "instruction", 1, 32)],
    "sentiment": [("one word", "instruction", 0, 8), ("free-form", "What is the sentiment of this review?", 0, 40)],
    "word_problems": [("number only", "Answer with the number only.", 0, 12), ("plain question", "", 0, 96)],
    "addition": [("zero-shot", "instruction", 0, 24), ("3-shot", "instruction", 3, 24)],
}


def _messages(case: dict, ask: str, demos: list[dict]) -> list[dict]:
    def user(row: dict) -> dict:
        head = row["instruction"] if ask == "instruction" else ask
        return {"role": "user", "content": f"{head}\n\n{row['input']}" if head else row["input"]}

    turns = [m for d in demos for m in (user(d), {"role": "assistant", "content": d["output"]})]
    return [*turns, user(case)]


# Each task's scorer from the one registry (workloads.scoring), as its eval recipes name it.
SCORERS = {
    "json_extraction": {"type": "json_match"},
    "sentiment": {"type": "choice", "labels": ["positive", "negative"], "reference_field": "label"},
    "word_problems": {"type": "numeric", "tolerance": 0, "reference_field": "answer"},
    "addition": {"type": "numeric", "tolerance": 0, "reference_field": "answer"},
}


def score(task: str, reply: str, case: dict) -> float:
    """The reply's score by its task's registered scorer: 1.0 when it carries the case's answer."""
    import workloads.prompting.scorers  # noqa: F401  (registers json_match and choice)
    from workloads.scoring import build_scorer

    return build_scorer(SCORERS[task])(reply, case)


def _generate(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, batch: int = 16) -> list[str]:
    import torch

    replies = []
    for start in range(0, len(chats), batch):
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in chats[start:start + batch]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        replies += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


def measure(model_name: str, items: int) -> dict:
    """The skill card: per task and variant, the share of the first `items` test cases answered right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workloads.models.loading import resolve_model_path
    from workloads.models.recipe import ModelConfig

    path = resolve_model_path(ModelConfig(name=model_name))
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    card: dict = {"model": model_name, "split": "test", "items": items, "decoding": "greedy", "tasks": {}}
    for task, variants in VARIANTS.items():
        cases = [json.loads(line) for line in task_path(task, "test").read_text().splitlines()[:items]]
        train = [json.loads(line) for line in task_path(task, "train").read_text().splitlines()]
        card["tasks"][task] = {}
        for name, ask, shots, max_new in variants:
            started = time.perf_counter()
            replies = _generate(model, tokenizer, [_messages(c, ask, train[:shots]) for c in cases], max_new)
            right = [score(task, r, c) for r, c in zip(replies, cases, strict=True)]
            card["tasks"][task][name] = {"accuracy": sum(right) / len(right), "example": replies[0][:160]}
            print(f"{task:16s} {name:15s} {sum(right) / len(right):6.1%}  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    return card


def table(card: dict) -> str:
    """The card as Markdown: one row per task, its variants' accuracies."""
    rows = ["| task | variant | held-out accuracy |", "| --- | --- | --- |"]
    for task, variants in card["tasks"].items():
        rows += [f"| {task} | {name} | {v['accuracy']:.0%} |" for name, v in variants.items()]
    return "\n".join(rows) + f"\n\n{card['items']} test items per row, greedy, {card['model']}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=100)
    args = parser.parse_args()
    card = measure(args.model, args.items)
    SKILL_CARDS.mkdir(parents=True, exist_ok=True)
    (SKILL_CARDS / f"{args.model}.json").write_text(json.dumps(card, indent=2) + "\n")
    (SKILL_CARDS / f"{args.model}.md").write_text(table(card))
    print(table(card))


if __name__ == "__main__":
    main()
