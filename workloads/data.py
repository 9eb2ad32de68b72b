"""Dataset formats, chat rendering, tokenization with completion-only labels, packing, batching.

Records in any supported format become chat `messages`, rendered with the tokenizer's own chat
template; labels cover assistant text only (unless `train_on_prompt`), located by character
offsets so any prefix-consistent template works.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from workloads.config import DataConfig, resolve_path

IGNORE_INDEX = -100
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant"}


def load_records(path: str) -> list[dict]:
    """Rows of a JSON, JSONL or Parquet file, read through `datasets`."""
    import datasets

    resolved = resolve_path(path)
    if resolved is None:
        raise FileNotFoundError(path)
    builder = "parquet" if resolved.suffix == ".parquet" else "json"
    datasets.disable_progress_bars()
    return list(datasets.load_dataset(builder, data_files=str(resolved), split="train"))


def to_messages(record: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """One record as chat messages; raises KeyError naming the field a format needs."""
    if fmt == "alpaca":
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    elif fmt == "messages":
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif fmt == "sharegpt":
        messages = [{"role": _SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    else:
        raise ValueError(f"format {fmt!r} has no chat form")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_messages(record: dict, fmt: str, system_prompt: str | None = None) -> tuple[list[dict], str]:
    """The messages before the last assistant turn, and that turn's text (the reference answer)."""
    messages = to_messages(record, fmt, system_prompt)
    return messages[:-1], messages[-1]["content"]


def tokenize_chat(messages: list[dict], tokenizer, max_length: int, train_on_prompt: bool = False) -> dict:
    """input_ids and labels for one conversation; labels are IGNORE_INDEX outside assistant turns."""
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = [(0, len(text))] if train_on_prompt else [
        (len(render(messages[:i], tokenize=False, add_generation_prompt=True)),
         len(render(messages[: i + 1], tokenize=False)))
        for i, m in enumerate(messages) if m["role"] == "assistant"
    ]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [
        tok if any(start <= lo < end for start, end in spans) else IGNORE_INDEX
        for tok, (lo, _hi) in zip(ids, enc["offset_mapping"], strict=False)
    ]
    return {"input_ids": ids, "labels": labels}


def tokenize_text(text: str, tokenizer, max_length: int) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples and cut into `max_length` blocks (labels keep their masks)."""
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [
        {"input_ids": ids[i : i + max_length], "labels": labels[i : i + max_length]}
        for i in range(0, len(ids), max_length)
    ]


def tokenize_records(records: list[dict], cfg: DataConfig, tokenizer) -> list[dict]:
    """Tokenize records in the configured format; drops examples with no trainable token."""
    out = []
    for record in records:
        if cfg.format == "text":
            ex = tokenize_text(record["text"], tokenizer, cfg.max_length)
        else:
            messages = to_messages(record, cfg.format, cfg.system_prompt)
            ex = tokenize_chat(messages, tokenizer, cfg.max_length, cfg.train_on_prompt)
        if any(label != IGNORE_INDEX for label in ex["labels"]):
            out.append(ex)
    return pack(out, cfg.max_length) if cfg.packing else out


def split_records(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval records: the eval file, or a seeded `eval_fraction` held out of the train file."""
    records = load_records(cfg.path)
    if cfg.eval_path:
        train, evals = records, load_records(cfg.eval_path)
    else:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(records) * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
        evals = [records[i] for i in order[:n_eval]]
        train = [records[i] for i in sorted(order[n_eval:])]
    if cfg.max_samples:
        train = train[: cfg.max_samples]
    return train, evals


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[dict], list[dict]]:
    """Tokenized train and eval examples, ready for `collate`."""
    train, evals = split_records(cfg, seed)
    train_ex = tokenize_records(train, cfg, tokenizer)
    if not train_ex:
        raise ValueError(f"data.path {cfg.path}: no example has a trainable token within max_length")
    return train_ex, tokenize_records(evals, cfg, tokenizer)


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get label IGNORE_INDEX and attention 0."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON lines (used for generated data and outputs)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
