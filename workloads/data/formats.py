"""Dataset formats, chat rendering, tokenization with completion-only labels, packing, batching.

Records in any supported format become chat `messages`, rendered with the tokenizer's own chat
template; labels cover assistant text only (unless `train_on_prompt`), located by character
offsets so any prefix-consistent template works. Where rows come from, and how several datasets
are mixed, is `data_sources`.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from workloads.data.recipe import DataConfig, DatasetConfig
from workloads.data.sources import map_columns, mix, read_path, read_source

IGNORE_INDEX = -100
_TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant"}


def load_records(path: str, builder: str | None = None) -> list[dict]:
    """Rows of a JSON, JSONL, Parquet or CSV file, or of a `save_to_disk` directory, read through `datasets`."""
    return read_path(path, builder)


def to_messages(record: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """One record as chat messages; raises KeyError naming the field a format needs."""
    if fmt == "alpaca":
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    elif fmt == "messages":
        messages = [_message(m) for m in record["messages"]]
    elif fmt == "sharegpt":
        messages = [{"role": _SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    else:
        raise ValueError(f"format {fmt!r} has no chat form")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _message(turn: dict) -> dict:
    """One `messages` turn: role and content, plus the tool-calling fields it has (keys `datasets` filled with None
    for rows that lack them are dropped)."""
    message = {"role": turn["role"], "content": turn.get("content") or ""}
    message.update({k: turn[k] for k in _TOOL_FIELDS if turn.get(k) is not None})
    return message


def record_tools(record: dict, fmt: str) -> list[dict] | None:
    """The tool definitions a `messages` row offers the model (its `tools` field), for the chat template."""
    return (record.get("tools") or None) if fmt == "messages" else None


def prompt_messages(record: dict, fmt: str, system_prompt: str | None = None) -> tuple[list[dict], str]:
    """The messages before the last assistant turn, and that turn's text (the reference answer)."""
    messages = to_messages(record, fmt, system_prompt)
    return messages[:-1], messages[-1]["content"]


def tokenize_chat(messages: list[dict], tokenizer, max_length: int, train_on_prompt: bool = False,
                  tools: list[dict] | None = None) -> dict:
    """input_ids and labels for one conversation (offering `tools`, if any); labels are IGNORE_INDEX outside
    assistant turns, which include the tool calls they make."""
    def render(turns: list[dict], **kwargs) -> str:
        return tokenizer.apply_chat_template(turns, tools=tools, **kwargs)

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
    """Whole examples, in order, into blocks of up to `max_length` tokens (a new block when the next one does not fit).

    position_ids restart at 0 for each example, from which `collate` builds the mask that keeps it from attending
    to the others; its first label is IGNORE_INDEX, so it is not predicted from the example before it.
    """
    blocks: list[dict] = []
    for ex in examples:
        n = len(ex["input_ids"])
        if not blocks or len(blocks[-1]["input_ids"]) + n > max_length:
            blocks.append({"input_ids": [], "labels": [], "position_ids": []})
        block = blocks[-1]
        block["input_ids"] += ex["input_ids"]
        block["labels"] += [IGNORE_INDEX, *ex["labels"][1:]]
        block["position_ids"] += range(n)
    return blocks


def tokenize_records(records: list[dict], cfg: DataConfig, tokenizer, fmt: str | None = None) -> list[dict]:
    """Tokenize records of format `fmt` (default `cfg.format`); drops those with no trainable token; packs if asked."""
    out = tokenize_examples(records, fmt or cfg.format, cfg, tokenizer)
    return pack(out, cfg.max_length) if cfg.packing else out


def tokenize_examples(records: list[dict], fmt: str, cfg: DataConfig, tokenizer) -> list[dict]:
    """Records of format `fmt` as examples (input_ids, labels), in order; those with no trainable token dropped."""
    out = []
    for record in records:
        if fmt == "text":
            ex = tokenize_text(record["text"], tokenizer, cfg.max_length)
        else:
            messages = to_messages(record, fmt, cfg.system_prompt)
            ex = tokenize_chat(messages, tokenizer, cfg.max_length, cfg.train_on_prompt, record_tools(record, fmt))
        if any(label != IGNORE_INDEX for label in ex["labels"]):
            out.append(ex)
    return out


def split_records(cfg: DataConfig, seed: int, source: DatasetConfig | None = None,
                  prefix: str = "data") -> tuple[list[dict], list[dict]]:
    """Train and eval records of one dataset (default: the first), columns mapped to its format's fields.

    Eval is the dataset's eval file, or a seeded `eval_fraction` held out of it; `max_samples` caps train.
    """
    if source is None:
        prefix, source = cfg.sources()[0]
    records = [map_columns(r, source.columns) for r in read_source(source, prefix)]
    if source.eval_path:
        train = records
        evals = [map_columns(r, source.columns) for r in read_source(source, prefix, eval_file=True)]
    else:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(records) * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
        evals = [records[i] for i in order[:n_eval]]
        train = [records[i] for i in sorted(order[n_eval:])]
    if cfg.max_samples:
        train = train[: cfg.max_samples]
    return train, evals


def eval_records(cfg: DataConfig, seed: int) -> list[tuple[str, dict]]:
    """(format, record) of every dataset's eval records, in dataset order: what eval generation replies to."""
    return [(source.format, record) for prefix, source in cfg.sources()
            for record in split_records(cfg, seed, source, prefix)[1]]


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[dict], list[dict]]:
    """Tokenized train and eval examples, ready for `collate`: several datasets mixed to their weights, then packed
    if asked; eval is every dataset's eval set in turn."""
    sources = cfg.sources()
    parts, evals = [], []
    for prefix, source in sources:
        train, held_out = split_records(cfg, seed, source, prefix)
        examples = tokenize_examples(train, source.format, cfg, tokenizer)
        if not examples:
            where = next(f"{prefix}.{name} {getattr(source, name)}" for name in ("path", "data_files", "hub")
                         if getattr(source, name) is not None)
            raise ValueError(f"{where}: no example has a trainable token within max_length")
        parts.append(examples)
        evals += tokenize_examples(held_out, source.format, cfg, tokenizer)
    train_ex = parts[0] if len(parts) == 1 else mix(parts, [source.weight for _, source in sources], seed)
    if cfg.packing:
        return pack(train_ex, cfg.max_length), pack(evals, cfg.max_length)
    return train_ex, evals


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get label IGNORE_INDEX and no attention.

    Packed blocks (examples with position_ids) also get their position_ids and, as attention_mask, a 4D boolean
    (batch, 1, length, length) mask: causal within each packed example, closed between them. A 4D mask is used as
    given by transformers' sdpa attention, on CPU as on GPU.
    """
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in batch[0]
    if packed:
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), 1, width, width), dtype=torch.bool)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
    else:
        mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        if not packed:
            mask[row, :n] = 1
            continue
        positions[row, :n] = torch.tensor(ex["position_ids"])
        example = torch.cumsum(positions[row, :n] == 0, 0)  # which packed example each token belongs to
        mask[row, 0, :n, :n] = (example[:, None] == example[None, :]) & causal[:n, :n]
        # Padding attends to the block's first token only: no row is empty (that would make NaNs), and its diagonal
        # stays False, which is how `count_tokens` tells padding apart. No real token attends to padding.
        mask[row, 0, n:, 0] = True
    if packed:
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens of a collated batch: the ones of a 2D mask, the diagonal of a packed 4D mask."""
    mask = batch["attention_mask"]
    return int(mask.diagonal(dim1=-2, dim2=-1).sum() if mask.dim() == 4 else mask.sum())


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON lines (used for generated data and outputs)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
