"""Bad data fails on the driver in seconds, naming the file, the line and the field; too-long rows are counted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_llmc
from workloads.common.recipe import RecipeError
from workloads.data.check import check_data, check_file
from workloads.data.recipe import DataConfig
from workloads.models.loading import load_tokenizer

GOOD = {"instruction": "Add the two numbers.", "input": "1 + 2", "output": "1 + 2 = 3"}


def write(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def config(path: str, fmt: str = "alpaca", **extra) -> DataConfig:
    return DataConfig(path=path, format=fmt, **extra)


def test_a_broken_line_is_named_with_its_number_and_the_rest_counted(tmp_path):
    lines = [json.dumps(GOOD)] * 3 + ['{"instruction": "x", '] + [json.dumps({"instruction": "y"})] * 7
    path = write(tmp_path, "broken.jsonl", lines)
    with pytest.raises(RecipeError) as err:
        check_data(config(path))
    message = str(err.value)
    assert "field 'data.path'" in message and "broken.jsonl" in message
    assert "line 4: not valid JSON" in message and "line 5: field 'output' is missing" in message
    assert "8 problem(s) in 10 rows" in message and "... and 3 more" in message


@pytest.mark.parametrize(
    ("fmt", "row", "expected"),
    [
        ("alpaca", {"instruction": "x", "output": 5}, "field 'output' must be a string, got int 5"),
        ("alpaca", ["not", "an", "object"], "a row is a JSON object, got list"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "field 'messages' has no assistant turn"),
        ("messages", {"messages": [{"role": "bot", "content": "hi"}]}, "field 'messages[0].role' must be one of"),
        ("sharegpt", {"conversations": "hello"}, "field 'conversations' must be a non-empty list"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                    "tool_calls": [{"function": {"name": "calc", "arguments": "{2 +"}}]}]},
         "field 'messages[1].tool_calls[0].function.arguments' is not valid JSON"),
        ("messages", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
         "field 'messages[0].tool_calls': only assistant turns make tool calls"),
        ("messages", {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]},
         "field 'messages[0].tool_calls[0].function.name' must be a non-empty string"),
        ("messages", {"tools": [{"type": "function"}], "messages": [{"role": "assistant", "content": "x"}]},
         "field 'tools' must be a list of tool definitions"),
        ("text", {"body": "x"}, "field 'text' is missing"),
    ],
)
def test_rows_missing_what_the_format_needs_name_the_field(tmp_path, fmt, row, expected):
    path = write(tmp_path, "rows.jsonl", [json.dumps(row)])
    with pytest.raises(RecipeError, match="line 1: " + expected.replace("[", r"\[").replace("]", r"\]")):
        check_data(config(path, fmt))


def test_an_empty_file_and_an_empty_eval_file_are_errors(tmp_path):
    empty = write(tmp_path, "empty.jsonl", [])
    with pytest.raises(RecipeError, match="field 'data.path'.*\n  the dataset holds no rows"):
        check_data(config(empty))
    good = write(tmp_path, "good.jsonl", [json.dumps(GOOD)])
    with pytest.raises(RecipeError, match="field 'data.eval_path'"):
        check_data(config(good, eval_path=empty))


def test_too_long_rows_are_counted_not_fatal_unless_none_remain(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    long = {**GOOD, "instruction": "Add the two numbers please. " * 20}
    path = write(tmp_path, "mixed.jsonl", [json.dumps(GOOD)] * 3 + [json.dumps(long)] * 2)
    report = check_file(path, config(path, max_length=32), tokenizer)
    assert (report.rows, report.too_long, report.usable) == (5, 2, 3)
    only_long = write(tmp_path, "long.jsonl", [json.dumps(long)] * 2)
    with pytest.raises(RecipeError, match="field 'data.max_length': none of the 2 rows"):
        check_file(only_long, config(only_long, max_length=32), tokenizer)


def test_a_missing_column_after_mapping_names_the_dataset_the_row_and_the_column(tmp_path):
    good = write(tmp_path, "good.jsonl", [json.dumps(GOOD)])
    mapped = write(tmp_path, "qa.csv", ["question,answer", "What is 1 + 2?,3", "What is 2 + 2?,4"])
    renamed = write(tmp_path, "renamed.csv", ["q,answer", "What is 1 + 2?,3"])
    cfg = DataConfig(format="alpaca", datasets=[
        {"path": good}, {"path": mapped, "columns": {"instruction": "question", "output": "answer"}, "weight": 0.5},
        {"path": renamed, "columns": {"instruction": "question", "output": "answer"}},
    ])
    with pytest.raises(RecipeError) as err:
        check_data(cfg)
    message = str(err.value)
    assert message.startswith(f"field 'data.datasets.2.path': {renamed} cannot be used as format 'alpaca'")
    assert "row 1: column 'question' (mapped to 'instruction') is missing; the row's columns: q, answer" in message
    reports = check_data(cfg.model_copy(update={"datasets": cfg.datasets[:2]}))
    assert [(Path(r.path).name, r.rows) for r in reports] == [("good.jsonl", 1), ("qa.csv", 2)]


def test_an_unreadable_csv_names_the_file(tmp_path):
    ragged = write(tmp_path, "ragged.csv", ["instruction,output", "a,1", "b,2,3"])
    with pytest.raises(RecipeError, match=f"field 'data.path': {ragged} is not a readable CSV file: .*line 3"):
        check_data(config(ragged))
    empty = write(tmp_path, "empty.csv", [])
    with pytest.raises(RecipeError, match=f"field 'data.datasets.0.path': {empty} is not a readable CSV file: .*no "
                                          "header row"):
        check_data(DataConfig(datasets=[{"path": empty, "format": "alpaca"}]))


def test_saved_datasets_and_data_files_are_checked_row_by_row(tmp_path, tiny_model_dir):
    import datasets

    long = {**GOOD, "instruction": "Add the two numbers please. " * 20}
    datasets.Dataset.from_list([GOOD, long, {**GOOD, "output": None}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(RecipeError, match=r"field 'data.path': .*saved cannot be used as format 'alpaca' \(1 problem"
                                          r"\(s\) in 3 rows\)\n  row 3: field 'output' is missing"):
        check_data(config(str(tmp_path / "saved")))
    datasets.Dataset.from_list([GOOD, long]).save_to_disk(str(tmp_path / "fixed"))
    report, = check_data(config(str(tmp_path / "fixed"), max_length=32), load_tokenizer(str(tiny_model_dir)))
    assert (report.rows, report.too_long) == (2, 1)
    for i in range(2):
        write(tmp_path, f"part-{i}.jsonl", [json.dumps({"q": "x", "a": "y"})] * 2)
    cfg = DataConfig(data_files=[str(tmp_path / "part-*.jsonl")], format="alpaca",
                     columns={"instruction": "q", "output": "a"})
    assert [r.rows for r in check_data(cfg)] == [4]


@pytest.mark.parametrize(("name", "fmt"), [("arithmetic", "alpaca"), ("arithmetic_tools", "messages")])
def test_the_bundled_data_passes(name, fmt):
    files = [f"workloads/bundled/{name}_train.jsonl", f"workloads/bundled/{name}_test.jsonl"]
    reports = check_data(config(files[0], fmt, eval_path=files[1]))
    assert [r.rows for r in reports] == [len((REPO / f).read_text().splitlines()) for f in files]


def test_finetune_with_broken_data_exits_2_before_ray_starts(tmp_path, tiny_model_dir):
    path = write(tmp_path, "broken.jsonl", [json.dumps(GOOD), "{oops"])
    started = time.monotonic()
    result = run_llmc("finetune", str(REPO / "workloads/configs/tiny-lora.yaml"), "--set", f"data.path={path}",
                      "--output-dir", str(tmp_path / "run"), env={"RAY_ADDRESS": ""}, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "line 2: not valid JSON" in result.stderr and "broken.jsonl" in result.stderr
    assert "Ray" not in result.stdout and not (tmp_path / "run" / "checkpoints").exists()
    print(f"\nbad data refused in {time.monotonic() - started:.1f}s")
    validated = run_llmc("validate", str(REPO / "workloads/configs/tiny-lora.yaml"), "--set", f"data.path={path}")
    assert validated.returncode == 2 and "line 2: not valid JSON" in validated.stderr
