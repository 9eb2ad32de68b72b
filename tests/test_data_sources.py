"""Data sources (CSV, save_to_disk, data_files, hub), column mapping, weighted mixing, and packing that keeps
packed examples from attending to each other: fast, no Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, run_llmc
from workloads.common.recipe import RecipeError
from workloads.data.check import check_data
from workloads.data.formats import (
    IGNORE_INDEX,
    build_datasets,
    collate,
    count_tokens,
    eval_records,
    pack,
    split_records,
    tokenize_records,
    write_jsonl,
)
from workloads.data.recipe import DataConfig
from workloads.data.sources import HUB_PROBE_TIMEOUT_S, mix
from workloads.kinds import validate_recipe
from workloads.models.loading import load_model, load_tokenizer
from workloads.serve.objectstore import free_port

ALPACA = [{"instruction": "Add the two numbers.", "input": f"{i} + 1", "output": f"{i} + 1 = {i + 1}"}
          for i in range(8)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def write_csv(path: Path, header: str, rows: list[str]) -> str:
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def recipe(data: dict, **model) -> dict:
    return {"model": {"name": "tiny", **model}, "data": data, "train": {"method": "lora", "max_steps": 1}}


def invalid(data: dict, **model) -> str:
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe(data, **model))
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Sources and column mapping
# ---------------------------------------------------------------------------------------------


def test_a_csv_with_other_column_names_trains_as_alpaca(tmp_path, tokenizer):
    """question,answer CSV + columns == the same rows as an alpaca JSONL; numbers and empty cells stay text."""
    csv_path = write_csv(tmp_path / "qa.csv", "question,answer,context",
                         [f"Add the two numbers.,{r['output']},{r['input']}" for r in ALPACA])
    columns = {"instruction": "question", "output": "answer", "input": "context"}
    from_csv = DataConfig(path=csv_path, format="alpaca", columns=columns, eval_fraction=0)
    from_jsonl = DataConfig(path=str(write_jsonl(ALPACA, tmp_path / "a.jsonl")), format="alpaca", eval_fraction=0)
    assert build_datasets(from_csv, tokenizer, 0) == build_datasets(from_jsonl, tokenizer, 0)
    numbers = write_csv(tmp_path / "n.csv", "question,answer,context", ["What is 2 + 3?,5,"])
    rows = split_records(DataConfig(path=numbers, format="alpaca", columns=columns, eval_fraction=0), 0)[0]
    assert rows == [{"question": "What is 2 + 3?", "answer": "5", "context": "",
                     "instruction": "What is 2 + 3?", "output": "5", "input": ""}]


def test_save_to_disk_directories_and_their_splits(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:6]),
                          "test": datasets.Dataset.from_list(ALPACA[6:])}).save_to_disk(str(tmp_path / "dict"))
    one = DataConfig(path=str(tmp_path / "one"), format="alpaca", eval_fraction=0)
    assert split_records(one, 0)[0] == ALPACA
    test_split = DataConfig(path=str(tmp_path / "dict"), split="test", format="alpaca", eval_fraction=0)
    assert split_records(test_split, 0)[0] == ALPACA[6:]
    with pytest.raises(RecipeError, match=r"field 'data.split': .*dict has no split 'validation'; allowed: \['test', "
                                          r"'train'\]"):
        split_records(test_split.model_copy(update={"split": "validation"}), 0)
    (tmp_path / "plain").mkdir()
    with pytest.raises(RecipeError, match="field 'data.path': .*plain is not a dataset written by save_to_disk"):
        split_records(DataConfig(path=str(tmp_path / "plain"), format="alpaca"), 0)


def test_data_files_globs_read_as_one_dataset(tmp_path):
    for i in range(2):
        write_jsonl(ALPACA[i * 4 : (i + 1) * 4], tmp_path / f"shard-{i}.data")  # no suffix to go by: builder says
    cfg = DataConfig(data_files=[str(tmp_path / "shard-*.data")], builder="json", format="alpaca", eval_fraction=0)
    assert split_records(cfg, 0)[0] == ALPACA


def test_an_unreachable_hub_fails_fast_naming_the_field(monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(RecipeError, match=r"field 'data.hub': the dataset hub http://127.0.0.1:\d+ cannot be reached.*"
                                          "HF_HUB_OFFLINE=1"):
        split_records(DataConfig(hub="tatsu-lab/alpaca", format="alpaca"), 0)
    assert time.monotonic() - started < HUB_PROBE_TIMEOUT_S + 2
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # offline: the cache only, and it is not there
    cfg = DataConfig(datasets=[{"path": "workloads/bundled/arithmetic_train.jsonl"},
                               {"hub": "llmc-tests/no-such-dataset", "split": "test"}], format="alpaca")
    with pytest.raises(RecipeError, match="field 'data.datasets.1.hub': hub dataset 'llmc-tests/no-such-dataset' "
                                          r"\(subset None, split 'test'\) cannot be read"):
        check_data(cfg)  # the driver's check reads every dataset
    assert time.monotonic() - started < HUB_PROBE_TIMEOUT_S + 5


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"path": "workloads/bundled/arithmetic_train.jsonl", "format": "alpaca", "columns": {"prompt": "q"}},
         "field 'data.columns': got {'prompt': 'q'}; columns: ['prompt'] are not fields of format 'alpaca'; allowed: "
         "instruction, input, output"),
        ({"path": "workloads/bundled/arithmetic_train.jsonl", "hub": "a/b", "format": "alpaca"},
         "set exactly one of path, data_files or hub; got path, hub"),
        ({"format": "alpaca"}, "set exactly one of path, data_files or hub; got none"),
        ({"path": "workloads/bundled/arithmetic_train.jsonl"}, "format is required; allowed: alpaca, messages"),
        ({"path": "workloads/bundled/arithmetic_train.jsonl", "format": "alpaca", "builder": "xml"},
         "field 'data.builder': got 'xml'; Input should be 'json', 'csv' or 'parquet'"),
        ({"data_files": ["no/such/*.jsonl"], "format": "alpaca"}, "field 'data.data_files'"),
        ({"hub": "not a dataset id", "format": "alpaca"}, "field 'data.hub': got 'not a dataset id'; a hub dataset id"),
        ({"path": "workloads/bundled/arithmetic_train.jsonl", "format": "alpaca", "split": "test"},
         "split 'test' needs a hub dataset or a save_to_disk DatasetDict directory"),
        ({"path": "workloads/bundled/arithmetic_train.jsonl", "format": "alpaca",
          "datasets": [{"path": "workloads/bundled/arithmetic_test.jsonl"}]},
         "datasets replaces the one-dataset fields: move path into its entries"),
        ({"datasets": [{"path": "workloads/bundled/arithmetic_train.jsonl", "format": "text", "weight": 0}]},
         "field 'data.datasets.0.weight': got 0; Input should be greater than 0"),
        ({"datasets": [{"path": "workloads/bundled/arithmetic_train.jsonl"}]},
         "datasets.0.format is required (or a default data.format)"),
        ({"format": "text", "datasets": [{"path": "workloads/bundled/arithmetic_train.jsonl",
                                          "columns": {"instruction": "q"}}]},
         "datasets.0.columns: ['instruction'] are not fields of format 'text'; allowed: text"),
        ({"datasets": []}, "field 'data.datasets': got []; List should have at least 1 item"),
    ],
)
def test_broken_data_sections_name_the_field_and_what_is_allowed(data, expected):
    assert expected in invalid(data)


def test_packing_is_refused_where_the_block_mask_would_not_isolate():
    data = {"path": "workloads/bundled/arithmetic_train.jsonl", "format": "alpaca", "packing": True}
    for attn in ("eager", "flash_attention_2"):
        message = invalid(data, attn_implementation=attn)
        assert f"model.attn_implementation '{attn}'" in message and "null or sdpa" in message
    for attn in (None, "sdpa"):
        assert validate_recipe(recipe(data, attn_implementation=attn)).data.packing


def test_a_mixed_recipe_validates_through_llmc(tmp_path):
    csv_path = write_csv(tmp_path / "qa.csv", "question,answer", [f"{r['input']},{r['output']}" for r in ALPACA])
    raw = yaml.safe_load((REPO / "workloads/configs/tiny-lora.yaml").read_text())
    raw["data"] = {"format": "alpaca", "max_length": 64, "datasets": [
        {"path": "workloads/bundled/arithmetic_train.jsonl", "weight": 0.7},
        {"path": csv_path, "columns": {"instruction": "question", "output": "answer"}, "weight": 0.3},
    ]}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_llmc("validate", str(path), timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout[result.stdout.index("{"):])["data_rows"]
    assert rows[str(tmp_path / "qa.csv")] == len(ALPACA) and len(rows) == 2


# ---------------------------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------------------------


def test_mix_draws_each_dataset_to_its_weight_deterministically():
    a, b = [("a", i) for i in range(10)], [("b", i) for i in range(30)]
    mixed = mix([a, b], [0.7, 0.3], seed=0)
    assert len(mixed) == 40 and sum(x[0] == "a" for x in mixed) == 28  # 0.7 x 40: a twice over, plus 8 drawn
    assert all(mixed.count(x) >= 2 for x in a) and len(set(x for x in mixed if x[0] == "b")) == 12  # b subsampled
    assert mixed == mix([a, b], [0.7, 0.3], seed=0) and mixed != mix([a, b], [0.7, 0.3], seed=1)


def test_build_datasets_mixes_formats_and_keeps_every_eval_set(tmp_path, tokenizer):
    alpaca = DataConfig(path=str(write_jsonl(ALPACA, tmp_path / "a.jsonl")), format="alpaca", eval_fraction=0.25)
    texts = [{"body": f"note {i}"} for i in range(4)]
    text = DataConfig(path=str(write_jsonl(texts, tmp_path / "t.jsonl")), format="text", columns={"text": "body"},
                      eval_fraction=0.25)
    mixed = DataConfig(eval_fraction=0.25, datasets=[
        {**alpaca.model_dump(include={"path", "format"}), "weight": 1.0},
        {**text.model_dump(include={"path", "format", "columns"}), "weight": 3.0},
    ])
    (a_train, a_eval), (t_train, t_eval) = build_datasets(alpaca, tokenizer, 0), build_datasets(text, tokenizer, 0)
    train, evals = build_datasets(mixed, tokenizer, 0)
    assert len(train) == len(a_train) + len(t_train) == 9  # 6 + 3, drawn 1:3
    from_a = [ex for ex in train if ex in a_train]
    assert len(from_a) == round(9 / 4) and all(ex in a_train or ex in t_train for ex in train)
    assert evals == a_eval + t_eval and train == build_datasets(mixed, tokenizer, 0)[0]
    assert [fmt for fmt, _ in eval_records(mixed, 0)] == ["alpaca"] * 2 + ["text"]


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model = load_model(str(tiny_model_dir))  # transformers' default attention: sdpa
    assert model.config._attn_implementation == "sdpa"
    return model.eval()


def _documents(tokenizer) -> list[dict]:
    cfg = DataConfig(path="workloads/bundled/arithmetic_train.jsonl", format="text", max_length=64)
    lines = ["12 + 30 = 42", "7 + 5 = 12 and 5 + 7 = 12", "1 + 1 = 2", "99 + 1 = 100, 98 + 2 = 100", "3 + 4 = 7"]
    return tokenize_records([{"text": line} for line in lines], cfg, tokenizer)


def test_a_packed_example_gets_the_logits_it_gets_alone(tokenizer, model):
    docs = _documents(tokenizer)
    blocks = pack(docs, 40)
    assert len(blocks) == 2 and len(blocks[1]["input_ids"]) < len(blocks[0]["input_ids"])  # a padded row too
    batch = collate(blocks, tokenizer.pad_token_id)
    assert batch["attention_mask"].shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert count_tokens(batch) == sum(len(d["input_ids"]) for d in docs)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    offsets = [(row, start) for row, block in enumerate(blocks)
               for start, pos in enumerate(block["position_ids"]) if pos == 0]
    assert len(offsets) == len(docs)
    for doc, (row, start) in zip(docs, offsets, strict=True):
        n = len(doc["input_ids"])
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([doc["input_ids"]])).logits[0]
        torch.testing.assert_close(packed[row, start : start + n], alone, atol=1e-4, rtol=1e-4)
        if start > 0:  # without the block mask, a later example sees the ones before it
            assert (leaky[row, start : start + n] - alone).abs().max() > 1e-2


def test_packed_loss_equals_the_unpacked_loss_and_trains_cleanly(tokenizer, model):
    docs = _documents(tokenizer)
    blocks = pack(docs, 40)
    assert all(block["labels"][start] == IGNORE_INDEX for block in blocks
               for start, pos in enumerate(block["position_ids"]) if pos == 0)  # never predicted across examples
    packed, unpacked = collate(blocks, tokenizer.pad_token_id), collate(docs, tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**unpacked).loss, atol=1e-5, rtol=1e-5)
    model.zero_grad()
    model(**packed).loss.backward()  # padding rows attend to something: no NaN reaches a gradient
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
