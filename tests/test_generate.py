"""`llmc generate`: offline batch generation through the real vLLM engine, in a subprocess like a user runs it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_llmc
from tests.test_serve import random_adapter

RECIPE = REPO / "workloads/configs/serve-tiny.yaml"


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow  # an in-process vLLM engine
def test_generate_writes_one_row_per_prompt_with_adapters_samples_and_stops(tmp_path, tiny_model_dir):
    adapter = random_adapter(tiny_model_dir, tmp_path / "arith")
    rows = [
        {"id": "base", "prompt": "12+7="},
        {"id": "named", "prompt": "12+7=", "adapter": "arith"},
        {"id": "path", "prompt": "12+7=", "adapter": str(adapter)},
        {"id": "chat", "messages": [{"role": "user", "content": "What is 3+4?"}], "n": 2, "temperature": 0.9},
        {"id": "short", "prompt": "hello", "max_tokens": 5},
    ]
    out = tmp_path / "out.jsonl"
    result = run_llmc("generate", str(RECIPE), "--input", _write(tmp_path / "in.jsonl", rows), "--output", str(out),
                      "--set", f"adapters.paths.arith={adapter}", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(answers) == [r["id"] for r in rows]  # same order, inputs kept
    base = answers["base"]  # greedy, up to the recipe's generate.max_tokens (32) unless the model ends its answer
    assert base["completion_tokens"] <= 32 and (base["completion_tokens"] == 32 or base["finish_reasons"] == ["stop"])
    assert answers["named"]["completion"] == answers["path"]["completion"]
    assert answers["named"]["completion"] != answers["base"]["completion"]  # the adapter changes greedy output
    assert len(answers["chat"]["completions"]) == 2 and answers["chat"]["prompt_tokens"] > 0
    assert answers["short"]["completion_tokens"] <= 5 and answers["short"]["finish_reasons"] in (["length"], ["stop"])
    assert '"tokens_per_s"' in result.stdout


def test_bad_prompt_file_exits_2_before_the_engine_starts(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"text": "no prompt here"}])
    result = run_llmc("generate", str(RECIPE), "--input", bad, "--output", str(tmp_path / "o.jsonl"), timeout=120)
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr, result.stderr
    assert not (tmp_path / "o.jsonl").exists()
    unknown = _write(tmp_path / "unknown.jsonl", [{"prompt": "x", "adapter": "nope"}])
    result = run_llmc("generate", str(RECIPE), "--input", unknown, "--output", str(tmp_path / "o.jsonl"), timeout=120)
    assert result.returncode == 2 and "adapter 'nope'" in result.stderr, result.stderr
