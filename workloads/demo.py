"""`make demo`: the main path end to end on embedded Ray with the tiny model.

1. fine-tune: build the tiny Llama (cached) and LoRA-tune it on the bundled arithmetic task across
   2 Ray Train workers with DeepSpeed ZeRO-2 (`tiny-lora.yaml`); loss curve, metrics and summary;
2. serve: deploy `serve-tiny.yaml` with the new adapter (as `tiny:arith`) beside the base model and
   ask both held-out questions through the `openai` client.

`python -m workloads.demo [--output-dir DIR] [--skip-serve]`; `--set key=value` overrides the
fine-tuning recipe (e.g. `--set train.max_steps=10` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
from pathlib import Path

from workloads.config import REPO_ROOT, load_recipe
from workloads.data import prompt_messages

FINETUNE_RECIPE = REPO_ROOT / "workloads/configs/tiny-lora.yaml"
SERVE_RECIPE = REPO_ROOT / "workloads/configs/serve-tiny.yaml"
QUESTIONS = REPO_ROOT / "workloads/bundled/arithmetic_test.jsonl"


def finetune_stage(output_dir: Path, overrides: list[str], address: str | None = None) -> dict:
    """LoRA fine-tuning of the tiny model on Ray Train + DeepSpeed; returns its summary."""
    from workloads.finetune import run

    recipe = load_recipe(FINETUNE_RECIPE, overrides, kind="finetune")
    print(f"[demo] 1/2 fine-tuning: {FINETUNE_RECIPE.relative_to(REPO_ROOT)} -> {output_dir}", flush=True)
    return run(recipe, output_dir=str(output_dir), address=address)


def serve_stage(adapter_dir: Path, questions: int = 5, address: str | None = None) -> dict:
    """Serve base + adapter, ask `questions` task questions through the openai client; returns the tally."""
    import openai

    from workloads.serve import serving

    key = "llmc-demo-" + secrets.token_hex(8)
    os.environ["LLMC_API_KEYS"] = key  # read by the serving driver, hashed before it reaches the cluster
    recipe = load_recipe(SERVE_RECIPE, [f"adapters.paths.arith={Path(adapter_dir).resolve()}"], kind="serve")
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines()[:questions]]
    base_model = recipe.engine.model_id
    adapter_model = f"{base_model}:arith"
    answers = []
    print(f"[demo] 2/2 serving: {SERVE_RECIPE.relative_to(REPO_ROOT)} with adapter {adapter_dir}", flush=True)
    with serving(recipe, address=address) as url:
        client = openai.OpenAI(base_url=url, api_key=key)
        print(f"\n[demo] asking {url} (models {[m.id for m in client.models.list().data]})")
        for row in rows:
            messages, expected = prompt_messages(row, "alpaca")
            answer = {"question": row["input"], "expected": expected}
            for model in (base_model, adapter_model):
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
                answer[model] = (reply.choices[0].message.content or "").strip()
            answers.append(answer)
            print(f"[demo] {row['input']:>9} = {expected:<5} base: {answer[base_model]!r:<14} "
                  f"fine-tuned: {answer[adapter_model]!r}")
    tally = {"questions": len(rows),
             "base_correct": sum(a[base_model] == a["expected"] for a in answers),
             "adapter_correct": sum(a[adapter_model] == a["expected"] for a in answers),
             "answers": answers}
    print(f"[demo] correct: base {tally['base_correct']}/{len(rows)}, "
          f"fine-tuned {tally['adapter_correct']}/{len(rows)}")
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/demo", help="fine-tuning run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the fine-tuning recipe (repeatable)")
    parser.add_argument("--skip-serve", action="store_true", help="stop after fine-tuning")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: embedded)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the answers
    if args.address is None:
        os.environ.pop("RAY_ADDRESS", None)  # the demo runs on its own embedded Ray
    out = Path(args.output_dir).resolve()
    summary = finetune_stage(out, args.overrides, args.address)
    tally = None if args.skip_serve else serve_stage(Path(summary["artifact"]), address=args.address)
    if tally is not None:
        (out / "demo_answers.json").write_text(json.dumps(tally, indent=2))
    print(f"\n[demo] eval loss {summary['initial_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f} "
          f"in {summary['steps']} steps, {summary['tokens_per_second']:.0f} tokens/s")
    print(f"[demo] results in {out}: summary.json, metrics.csv, loss_curve.png, adapter/ (PEFT), recipe.yaml, "
          "demo_answers.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
