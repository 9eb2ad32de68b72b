"""`llmc chat`: turns from stdin, the history kept until /reset, replies from a local model (here) or a served
one (tests/test_serve.py, on its server)."""

from __future__ import annotations

import io

from tests.conftest import run_llmc
from workloads.scoring.answers import final_number
from workloads.serve.chat import converse


def model_replies(stdout: str) -> list[str]:
    return [line.removeprefix("model> ") for line in stdout.splitlines() if line.startswith("model> ")]


def test_chat_with_the_local_tiny_model_answers_its_sums(tiny_model_dir):
    result = run_llmc("chat", "--model-dir", str(tiny_model_dir), "--max-tokens", "24",
                      stdin="What is 12 plus 30?\n/reset\nWhat is 7 plus 58?\n/exit\nWhat is 1 plus 1?\n", timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"chatting with {tiny_model_dir}" in result.stderr
    replies = model_replies(result.stdout)
    assert [final_number(r) for r in replies] == [42, 65], replies  # nothing after /exit is asked
    assert "[llmc] new conversation" in result.stdout


def test_converse_sends_the_whole_history_and_reset_starts_over():
    seen = []

    def reply(history: list[dict]):
        seen.append([m["content"] for m in history])
        yield f"answer {len(history)}"

    turns = converse(reply, io.StringIO("a\n\nb\n/reset\nc\n"), io.StringIO(), system="be brief")
    assert turns == 3
    assert seen == [["be brief", "a"], ["be brief", "a", "answer 2", "b"], ["be brief", "c"]]


def test_chat_needs_exactly_one_of_url_and_model_dir_and_a_real_model_dir(tmp_path):
    neither = run_llmc("chat", stdin="", timeout=120)
    assert neither.returncode == 2 and "'--url' and '--model-dir'" in neither.stderr, neither.stderr
    missing = run_llmc("chat", "--model-dir", str(tmp_path), stdin="", timeout=120)
    assert missing.returncode == 2 and "field '--model-dir'" in missing.stderr and "config.json" in missing.stderr
