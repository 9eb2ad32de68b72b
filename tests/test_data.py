"""Data formats, completion-only labels, packing and splits, on the real tiny tokenizer."""

from __future__ import annotations

import json

import pytest

from workloads.config import DataConfig
from workloads.data import IGNORE_INDEX, build_datasets, collate, pack, tokenize_chat, write_jsonl
from workloads.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


ROWS = {
    "alpaca": {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"},
    "messages": {"messages": [{"role": "user", "content": "2 + 3"}, {"role": "assistant", "content": "5"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "2 + 3"}, {"from": "gpt", "value": "5"}]},
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_chat_formats_train_only_on_the_answer(tmp_path, tokenizer, fmt):
    path = write_jsonl([ROWS[fmt]] * 4, tmp_path / "d.jsonl")
    train, evals = build_datasets(DataConfig(path=str(path), format=fmt, eval_fraction=0.25), tokenizer, seed=0)
    assert len(train) == 3 and len(evals) == 1
    assert _labelled_text(tokenizer, train[0]).strip() == "5<|im_end|>"
    assert "2 + 3" in tokenizer.decode(train[0]["input_ids"])


def test_train_on_prompt_and_text_format(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "2 + 3"}, {"role": "assistant", "content": "5"}]
    full = tokenize_chat(messages, tokenizer, 64, train_on_prompt=True)
    assert IGNORE_INDEX not in full["labels"]
    path = write_jsonl([{"text": "one two three"}] * 3, tmp_path / "t.jsonl")
    train, _ = build_datasets(DataConfig(path=str(path), format="text", eval_fraction=0.0), tokenizer, seed=0)
    assert train[0]["labels"] == train[0]["input_ids"] and train[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_multi_turn_labels_every_assistant_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "2 + 2"},
                {"role": "assistant", "content": "4"}]
    labelled = _labelled_text(tokenizer, tokenize_chat(messages, tokenizer, 128))
    assert "2" in labelled and "4" in labelled and "1 + 1" not in labelled and "Be brief" not in labelled


def test_parquet_packing_and_collate(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Add.", "input": f"{i} + 1", "output": str(i + 1)} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = DataConfig(path=str(tmp_path / "d.parquet"), format="alpaca", eval_fraction=0.0, packing=True, max_length=32)
    train, _ = build_datasets(cfg, tokenizer, seed=0)
    assert all(len(ex["input_ids"]) == 32 for ex in train[:-1])
    unpacked = build_datasets(cfg.model_copy(update={"packing": False}), tokenizer, seed=0)[0]
    assert sum(len(e["input_ids"]) for e in train) == sum(len(e["input_ids"]) for e in unpacked)
    assert pack(unpacked, 32) == train
    batch = collate(unpacked[:3], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_bundled_task_has_exact_answers():
    from tests.conftest import REPO

    rows = [json.loads(line) for line in (REPO / "workloads/bundled/arithmetic_test.jsonl").read_text().splitlines()]
    assert len(rows) == 200
    assert all(int(r["output"]) == sum(map(int, r["input"].split(" + "))) for r in rows)
