"""The bundled arithmetic data, generated here: `python -m workloads.bundled.make_arithmetic` rewrites the files.

Two-number addition (a, b in 0..99) in two phrasings:
- the pretraining phrasing of the tiny model (`pretraining_conversations`, generated in memory by the model
  factory): "What is 49 plus 97?" -> "The sum of 49 and 97 is 146." (one wording: with four, the sum stopped
  transferring to the task, 4 of 50 after the LoRA);
- the bundled task (`arithmetic_{train,test}.jsonl`, alpaca) asks another way ("Add the two numbers." then
  "49 + 97") and answers in the same restating style: the tiny model adds only when the operands come right
  before the sum, and a 60-step LoRA can teach it to read a new question but not a new answer style
  (`49 + 97 = 146` answers stayed below 10% correct after 200 LoRA steps).
The test pairs are held out of everything else: no train file and no pretraining conversation contains them.
Beside the task: preference pairs (`arithmetic_preference_*.jsonl`: a correct and a wrong answer to one
question, for reward models and DPO), ReAct traces that call a calculator tool in the text protocol
(`arithmetic_react_*.jsonl`) and the same calls through OpenAI tool calling (`arithmetic_tools_*.jsonl`: rows with
`tools` and assistant `tool_calls`, rendered by the tiny model's chat template as `<tool_call>` JSON).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
INSTRUCTION = "Add the two numbers and state the sum in a sentence."
TEST_PAIRS, TRAIN_PAIRS = 200, 4000
TEST_SEED, TRAIN_SEED = 1, 0
REACT_SYSTEM = (
    "Answer the question using the calculator tool. Use this format:\n"
    "Thought: what to do next\nAction: calculator\nAction Input: {\"expression\": \"<a> + <b>\"}\n"
    "Then wait for the Observation, and finish with\nThought: I know the answer\nFinal Answer: <a> + <b> = <sum>"
)
TOOLS_SYSTEM = "Answer the question using the calculator tool."

Pair = tuple[int, int]


def make_pairs(n: int, seed: int, exclude: frozenset[Pair] | set[Pair] = frozenset()) -> list[Pair]:
    """n distinct (a, b) with a, b in 0..99, none of them in `exclude`, in a seeded order."""
    rng = random.Random(seed)
    seen, pairs = set(exclude), []
    while len(pairs) < n:
        pair = (rng.randrange(100), rng.randrange(100))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def split_pairs() -> tuple[list[Pair], list[Pair]]:
    """The train and held-out test pairs every bundled file is made from."""
    test = make_pairs(TEST_PAIRS, TEST_SEED)
    return make_pairs(TRAIN_PAIRS, TRAIN_SEED, exclude=set(test)), test


def answer(a: int, b: int, total: int | None = None) -> str:
    """An answer in the restating style: the operands, then the sum (or `total`, for a wrong answer)."""
    return f"The sum of {a} and {b} is {a + b if total is None else total}."


def task_row(a: int, b: int) -> dict:
    return {"instruction": INSTRUCTION, "input": f"{a} + {b}", "output": answer(a, b)}


def task_prompt(a: int, b: int) -> list[dict]:
    """The bundled question as chat messages (what `data.to_messages` makes of a task row, less the answer)."""
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{a} + {b}"}]


def pretraining_prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} plus {b}?"}]


def pretraining_conversations(exclude: set[Pair]) -> list[list[dict]]:
    """Every pair of 0..99 not in `exclude`, in the pretraining phrasing, as chat messages (in pair order)."""
    return [
        pretraining_prompt(a, b) + [{"role": "assistant", "content": answer(a, b)}]
        for a in range(100) for b in range(100) if (a, b) not in exclude
    ]


def wrong_sum(a: int, b: int, rng: random.Random) -> int:
    """A plausible mistake: off by one, a dropped or doubled carry, or an operand misread; never the sum."""
    s = a + b
    candidates = [s + 1, s - 1, s + 10, s - 10, s + 100, a + b % 10, a - b, (s % 10) * 10 + s // 10 % 10]
    return rng.choice([c for c in candidates if c >= 0 and c != s])


def preference_row(a: int, b: int, rng: random.Random) -> dict:
    """TRL's conversational preference format: prompt, chosen (the right answer), rejected (a wrong one)."""
    return {
        "prompt": task_prompt(a, b),
        "chosen": [{"role": "assistant", "content": answer(a, b)}],
        "rejected": [{"role": "assistant", "content": answer(a, b, wrong_sum(a, b, rng))}],
    }


def react_row(a: int, b: int) -> dict:
    """One ReAct trace: think, call the calculator, read its observation, answer."""
    expression = f"{a} + {b}"
    return {"messages": [
        {"role": "system", "content": REACT_SYSTEM},
        {"role": "user", "content": f"What is {expression}?"},
        {"role": "assistant", "content": "Thought: I should add the numbers with the calculator.\n"
                                         f"Action: calculator\nAction Input: {json.dumps({'expression': expression})}"},
        {"role": "user", "content": f"Observation: {a + b}"},
        {"role": "assistant", "content": f"Thought: I know the answer\nFinal Answer: {answer(a, b)}"},
    ]}


def tool_call_row(a: int, b: int) -> dict:
    """One native tool-calling trace: the calculator call, the tool's result, the answer. Arguments are a JSON string,
    as on the OpenAI wire (and as `datasets` keeps them intact: a dict column gains every other row's keys)."""
    from workloads.prompting.tools import calculator_tool

    tool = calculator_tool()
    expression = f"{a} + {b}"
    return {
        "tools": [{"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                    "parameters": tool.parameters}}],
        "messages": [
            {"role": "system", "content": TOOLS_SYSTEM},
            {"role": "user", "content": f"What is {expression}?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": tool.name, "arguments": json.dumps({"expression": expression})}}]},
            {"role": "tool", "content": str(a + b)},
            {"role": "assistant", "content": f"The answer is {a + b}."},  # the tool's result, not a sum of its own
        ],
    }


def build_files() -> dict[str, list[dict]]:
    """Every bundled file's rows, by file name."""
    train, test = split_pairs()
    rng = random.Random(2)
    return {
        "arithmetic_train.jsonl": [task_row(a, b) for a, b in train],
        "arithmetic_test.jsonl": [task_row(a, b) for a, b in test],
        "arithmetic_preference_train.jsonl": [preference_row(a, b, rng) for a, b in train[:2000]],
        "arithmetic_preference_test.jsonl": [preference_row(a, b, rng) for a, b in test],
        "arithmetic_react_train.jsonl": [react_row(a, b) for a, b in train[:500]],
        "arithmetic_react_test.jsonl": [react_row(a, b) for a, b in test[:100]],
        "arithmetic_tools_train.jsonl": [tool_call_row(a, b) for a, b in train[500:1000]],
        "arithmetic_tools_test.jsonl": [tool_call_row(a, b) for a, b in test[:100]],
    }


def main() -> None:
    for name, rows in build_files().items():
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {HERE / name}")


if __name__ == "__main__":
    main()
