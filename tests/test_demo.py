"""The demo's own output: its answers table shows each model's final answer, however long the reply, and what it
records for the README is its demo.json without the answers and the run's paths."""

from __future__ import annotations

import json

from scripts.readme_numbers import block, record
from workloads.demo import _print_side_by_side

LONG = "To add 64 and 44, first add the tens, then the ones, and the sum is 108"


def _results() -> dict:
    answers = [{"question": "64 + 44", "expected": "64 + 44 = 108", "base": LONG, "base_right": True,
                "adapter": "64 + 44 = 108", "adapter_right": True}] * 3
    return {"addition": {"adapter": "smollm2:addition", "questions": 3, "scoring": "final_number",
                         "base_correct": 3, "adapter_correct": 3, "answers": answers}}


def test_the_answers_table_shows_the_end_of_each_reply_where_the_final_answer_is(capsys):
    _print_side_by_side(_results())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and "smollm2:addition" in lines[0]
    assert all(line.split()[1] == "108" for line in lines[1:4]), lines  # the expected answer, not its question
    assert all("sum is 108" in line and "64 + 44 = 108" in line for line in lines[1:4]), lines
    assert lines[-1].endswith("right of 3: base 3, smollm2:addition 3")


def test_a_recorded_run_keeps_its_numbers_and_drops_answers_and_paths(tmp_path):
    run = {"model": "smollm2-135m", "held_out": 100, "seconds": {"total": 900.0},
           "prompting": {"cases": 100, "accuracy": {"zero-shot": 0.03, "one-shot": 0.71}, "zero_shot": 0.03,
                         "search": {"variants": 4, "stopped_early": 3, "best_variant": "few-shot",
                                    "best_dev_accuracy": 0.85, "best_test_accuracy": 0.73}},
           "sft": {"steps": 10, "initial_eval_exact_match": 0.43, "final_eval_exact_match": 1.0,
                   "initial_eval_loss": 0.93, "final_eval_loss": 0.006, "artifact": "/x/sft/adapter"},
           "grpo": {"iterations": 4, "held_out_prompts": 50, "initial_mean_reward": 0.13, "final_mean_reward": 0.29,
                    "final_kl": 0.28, "artifact": "/x/grpo/adapter"},
           "served": _results()}
    (tmp_path / "demo.json").write_text(json.dumps(run))
    kept = record(tmp_path)
    assert "artifact" not in kept["sft"] and "artifact" not in kept["grpo"]
    assert "answers" not in kept["served"]["addition"] and kept["served"]["addition"]["adapter_correct"] == 3
    text = block(kept)
    assert "zero-shot 3%, one-shot 71%" in text and "43% -> 100%" in text
    assert "on 50 held-out prompts 13% -> 29%" in text
    assert "`smollm2:addition` 3 of 3" in text and "15 minutes" in text
