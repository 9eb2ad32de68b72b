"""Data formats, completion-only labels, packing and splits, on the real tiny tokenizer."""

from __future__ import annotations

import json
import re

import pytest

from workloads.data.formats import IGNORE_INDEX, build_datasets, collate, load_records, pack, tokenize_chat, write_jsonl
from workloads.data.recipe import DataConfig
from workloads.models.loading import load_tokenizer
from workloads.scoring.answers import final_number


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
    cfg = DataConfig(path=str(tmp_path / "d.parquet"), format="alpaca", eval_fraction=0.0, packing=True, max_length=64)
    train, _ = build_datasets(cfg, tokenizer, seed=0)
    unpacked = build_datasets(cfg.model_copy(update={"packing": False}), tokenizer, seed=0)[0]
    assert len(train) < len(unpacked) and all(len(ex["input_ids"]) <= 64 for ex in train)
    assert [t for ex in train for t in ex["input_ids"]] == [t for ex in unpacked for t in ex["input_ids"]]
    starts = [ex["position_ids"].count(0) for ex in train]  # whole examples, each from position 0
    assert sum(starts) == len(unpacked)
    assert pack(unpacked, 64) == train
    batch = collate(unpacked[:3], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def _bundled(name: str) -> list[dict]:
    from tests.conftest import REPO

    return [json.loads(line) for line in (REPO / "workloads/bundled" / name).read_text().splitlines()]


def _operands(text: str) -> tuple[int, int]:
    """The two numbers of a question (its last line)."""
    a, b = map(int, re.findall(r"\d+", text.splitlines()[-1]))
    return a, b


def test_bundled_task_restates_the_operands_and_holds_its_test_pairs_out():
    """Same answer style as the tiny model's pretraining, another question phrasing, test pairs seen nowhere."""
    from workloads.bundled import make_arithmetic
    from workloads.models.pretrain import corpus

    train, test = _bundled("arithmetic_train.jsonl"), _bundled("arithmetic_test.jsonl")
    assert len(test) == 200 and len(train) == 4000
    for row in train + test:
        a, b = _operands(row["input"])
        assert row["output"] == f"The sum of {a} and {b} is {a + b}." and final_number(row["output"]) == a + b
    held_out = {_operands(r["input"]) for r in test}
    assert not held_out & {_operands(r["input"]) for r in train}
    pretraining = {_operands(c[0]["content"]) for c in corpus()}
    assert len(pretraining) == 100 * 100 - 200 and not held_out & pretraining
    assert "plus" not in test[0]["instruction"] + test[0]["input"]  # the task's phrasing is not the pretraining one
    assert make_arithmetic.build_files()["arithmetic_test.jsonl"] == test  # the files are what the code makes


def test_preference_pairs_prefer_the_right_sum(tokenizer):
    from workloads.data.formats import tokenize_chat

    for name, size, questions in (("arithmetic_preference_train.jsonl", 2000, "arithmetic_train.jsonl"),
                                  ("arithmetic_preference_test.jsonl", 200, "arithmetic_test.jsonl")):
        rows = load_records(f"workloads/bundled/{name}")  # through the loader training uses
        assert len(rows) == size
        prompts = {f"{r['instruction']}\n\n{r['input']}" for r in _bundled(questions)}
        for row in rows:
            (user,), (chosen,), (rejected,) = row["prompt"], row["chosen"], row["rejected"]
            assert user["role"] == "user" and user["content"] in prompts
            assert chosen["role"] == rejected["role"] == "assistant"
            a, b = _operands(user["content"])
            assert final_number(chosen["content"]) == a + b and final_number(rejected["content"]) != a + b
            assert rejected["content"].startswith(f"The sum of {a} and {b} is ")  # same style, another sum
    labelled = _labelled_text(tokenizer, tokenize_chat(row["prompt"] + row["chosen"], tokenizer, 64))
    assert labelled.strip() == chosen["content"] + "<|im_end|>"


def test_react_traces_call_the_calculator_and_answer_right():
    from workloads.data.formats import split_records
    from workloads.data.recipe import DataConfig

    for name, size in (("arithmetic_react_train.jsonl", 500), ("arithmetic_react_test.jsonl", 100)):
        rows = split_records(DataConfig(path=f"workloads/bundled/{name}", format="messages", eval_fraction=0), 0)[0]
        assert len(rows) == size
        for row in rows:
            system, question, act, observation, final = row["messages"]
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
            a, b = _operands(question["content"])
            lines = act["content"].splitlines()
            assert lines[0].startswith("Thought: ") and lines[1] == "Action: calculator"
            tool_input = json.loads(lines[2].removeprefix("Action Input: "))
            assert tool_input == {"expression": f"{a} + {b}"}
            assert observation["content"] == f"Observation: {a + b}"
            thought, answer = final["content"].splitlines()
            assert thought.startswith("Thought: ") and answer.startswith("Final Answer: ")
            assert final_number(answer) == a + b and "calculator" in system["content"]


def test_final_number_scores_the_last_number():
    assert final_number("17 + 72 = 89") == 89 and final_number("The sum of 3 and 4 is 7.") == 7
    assert final_number("no digits") is None and final_number("") is None


def test_tool_calling_traces_render_the_tools_train_on_the_calls_and_parse_back(tokenizer):
    """The tiny model's chat template lists the offered tools in the system turn and writes an assistant's tool calls
    as <tool_call> JSON, trained like any assistant text; vLLM's `hermes` parser (the serve recipe's) reads that text
    back as the same call. Rows without tools render exactly as ChatML always did."""
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    from workloads.data.formats import record_tools, split_records, to_messages
    from workloads.data.recipe import DataConfig

    rows = split_records(DataConfig(path="workloads/bundled/arithmetic_tools_train.jsonl", format="messages",
                                    eval_fraction=0), 0)[0]
    assert len(rows) == 500
    row = rows[0]
    a, b = _operands(row["messages"][1]["content"])
    messages, tools = to_messages(row, "messages"), record_tools(row, "messages")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert [t["function"]["name"] for t in tools] == ["calculator"] and messages[3]["content"] == str(a + b)
    example = tokenize_chat(messages, tokenizer, 512, tools=tools)
    text = tokenizer.decode(example["input_ids"])
    assert "\n\nTools:\n- calculator(expression): Evaluate an arithmetic expression" in text
    call = f'<tool_call>{{"arguments": {{"expression": "{a} + {b}"}}, "name": "calculator"}}</tool_call>'
    assert _labelled_text(tokenizer, example) == f"{call}<|im_end|>\nThe answer is {a + b}.<|im_end|>\n"
    parsed = Hermes2ProToolParser(tokenizer).extract_tool_calls(call, None)
    assert parsed.tools_called and [c.function.name for c in parsed.tool_calls] == ["calculator"]
    assert json.loads(parsed.tool_calls[0].function.arguments) == {"expression": f"{a} + {b}"}
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == \
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
