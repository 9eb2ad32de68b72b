"""Regenerate the bundled arithmetic task: `python -m workloads.bundled.make_arithmetic`.

Two-number addition with one exact answer, small enough that a tiny Llama learns its format in a
few dozen CPU steps and its digits over a few hundred, so later stages get a real signal
(exact-match accuracy, a reward that rises).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
INSTRUCTION = "Add the two numbers. Answer with the sum only."


def make_rows(n: int, seed: int, exclude: set[tuple[int, int]] = frozenset()) -> list[dict]:
    """n distinct `a + b` problems with a, b in 0..99, none of them in `exclude`."""
    rng = random.Random(seed)
    seen, rows = set(exclude), []
    while len(rows) < n:
        a, b = rng.randrange(100), rng.randrange(100)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"instruction": INSTRUCTION, "input": f"{a} + {b}", "output": str(a + b)})
    return rows


def main() -> None:
    test = make_rows(200, seed=1)
    train = make_rows(4000, seed=0, exclude={tuple(map(int, r["input"].split(" + "))) for r in test})
    for name, rows in (("arithmetic_train.jsonl", train), ("arithmetic_test.jsonl", test)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {HERE / name}")


if __name__ == "__main__":
    main()
