"""The driver's tokenized data kept between runs (`data.cache`, workloads/data/prepared.py): a rerun on unchanged
files and data settings takes the first run's examples without loading a tokenizer; anything the examples depend on
(a file's contents, a data setting, the seed, the chat template, the eval generation settings) makes it tokenize
again, and `data.cache: false` keeps nothing."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from workloads.data.formats import write_jsonl
from workloads.finetune import driver
from workloads.kinds import load_recipe

TINY = REPO / "workloads/configs/tiny-lora.yaml"


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"What is {i} plus {i + 7}?", "output": f"The sum is {2 * i + 7}."} for i in range(n)]


@pytest.fixture
def prepare(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`driver.prepare` of the tiny LoRA recipe on a 60-row file with a cache of this test's own; returns the data,
    what it printed and how many tokenizers it loaded (the real loader, counted)."""
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))
    loaded = []
    real = driver.load_tokenizer
    monkeypatch.setattr(driver, "load_tokenizer", lambda *args: loaded.append(args) or real(*args))
    path = write_jsonl(_rows(60), tmp_path / "rows.jsonl")

    def run(*overrides: str) -> tuple[tuple, str, int]:
        before = len(loaded)
        recipe = load_recipe(TINY, [f"model.name={tiny_model_dir}", f"data.path={path}", "data.eval_path=null",
                                    "data.eval_fraction=0.2", "eval.generate=true", "eval.generate_samples=5",
                                    *overrides])
        data = driver.prepare(recipe).data
        return data, capsys.readouterr().out, len(loaded) - before

    run.path = path
    return run


def test_a_rerun_takes_the_first_runs_examples_without_loading_a_tokenizer(prepare, tmp_path):
    first, printed, tokenizers = prepare()
    assert tokenizers == 1 and "earlier run" not in printed and "rows.jsonl: 60 rows" in printed
    again, printed, tokenizers = prepare("train.learning_rate=0.5", "train.max_steps=3", "lora.r=4")
    assert tokenizers == 0 and "rows.jsonl: 60 rows" in printed and "tokenized by an earlier run" in printed
    assert again == first and len(first[0]) == 48 and len(first[1]) == 12 and len(first[2]) == 5
    assert len(list((tmp_path / "cache" / "prepared").glob("*.json"))) == 1


CHANGES = ["data.max_length=20", "train.seed=7", "data.system_prompt=Be brief.", "eval.generate_samples=3",
           "model.chat_template='{% for m in messages %}{{ m.content }} {% endfor %}'"]


@pytest.mark.parametrize("change", CHANGES)
def test_what_the_examples_depend_on_makes_it_tokenize_again(prepare, change):
    first, _, _ = prepare()
    changed, printed, tokenizers = prepare(change)
    assert tokenizers == 1 and "earlier run" not in printed and changed != first


def test_a_file_rewritten_with_the_same_size_is_tokenized_again(prepare):
    first, _, _ = prepare()
    text = prepare.path.read_text()
    prepare.path.write_text(text.replace("What is 1 plus", "What is 9 plus"))  # same size, within the same tick
    changed, printed, tokenizers = prepare()
    assert tokenizers == 1 and "earlier run" not in printed and changed != first


def test_cache_off_keeps_nothing(prepare, tmp_path):
    prepare("data.cache=false")
    _, printed, tokenizers = prepare("data.cache=false")
    assert tokenizers == 1 and "earlier run" not in printed
    assert not (tmp_path / "cache" / "prepared").exists()
