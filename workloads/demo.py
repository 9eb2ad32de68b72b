"""The demo's serving stage: serve the fine-tuned adapter beside its base model and ask both a few task questions.

`serve_stage(adapter_dir)` deploys `serve-tiny.yaml` with that adapter (as `tiny:arith`) on the
current Ray (embedded by default), asks held-out arithmetic questions through the `openai` client,
prints base and adapter answers side by side, and tears the app down. `python -m workloads.demo_serve
runs/tiny-lora/adapter` runs it alone.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from workloads.config import REPO_ROOT, load_recipe
from workloads.data import prompt_messages

RECIPE = REPO_ROOT / "workloads/configs/serve-tiny.yaml"
QUESTIONS = REPO_ROOT / "workloads/bundled/arithmetic_test.jsonl"


def serve_stage(adapter_dir: Path, questions: int = 5, address: str | None = None) -> dict:
    """Serve base + adapter, ask `questions` task questions through the openai client; returns the tally."""
    import openai

    from workloads.serve import serving

    key = "llmc-demo-" + secrets.token_hex(8)
    os.environ["LLMC_API_KEYS"] = key  # read by the serving driver, hashed before it reaches the cluster
    recipe = load_recipe(RECIPE, [f"adapters.paths.arith={Path(adapter_dir).resolve()}"], kind="serve")
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines()[:questions]]
    tally = {"questions": len(rows), "base_correct": 0, "adapter_correct": 0}
    with serving(recipe, address=address) as url:
        client = openai.OpenAI(base_url=url, api_key=key)
        adapter_model = f"{recipe.engine.model_id}:arith"
        print(f"\n[demo] asking {url} (models {[m.id for m in client.models.list().data]})")
        for row in rows:
            messages, expected = prompt_messages(row, "alpaca")
            answers = {}
            for model in (recipe.engine.model_id, adapter_model):
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
                answers[model] = (reply.choices[0].message.content or "").strip()
            tally["base_correct"] += answers[recipe.engine.model_id] == expected
            tally["adapter_correct"] += answers[adapter_model] == expected
            print(f"[demo] {row['input']:>9} = {expected:<5} base: {answers[recipe.engine.model_id]!r:<14} "
                  f"fine-tuned: {answers[adapter_model]!r}")
        print(f"[demo] correct: base {tally['base_correct']}/{len(rows)}, "
              f"fine-tuned {tally['adapter_correct']}/{len(rows)}")
    return tally


if __name__ == "__main__":
    serve_stage(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-lora/adapter"))
