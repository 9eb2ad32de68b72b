"""`make demo`: the main path end to end on embedded Ray with the tiny model.

1. fine-tune: build the tiny Llama (pretrained once, cached) and LoRA-tune it on the bundled arithmetic task across
   2 Ray Train workers with DeepSpeed ZeRO-2 (`tiny-lora.yaml`, stopped after 8 of its 60 steps: about half the
   held-out sums right, which leaves the next stage room to show); loss curve, metrics and summary;
2. align: GRPO from that adapter with the exact-answer reward (`tiny-grpo.yaml`: 2 Ray Train workers sampling
   from a vLLM engine actor, the adapter synced into it after every update) into `align/`;
3. serve: deploy `serve-tiny.yaml` with both adapters (as `tiny:arith` and `tiny:aligned`) beside the base model
   and ask all three the 200 held-out questions (those GRPO was scored on) through the `openai` client (chat
   format) and count the answers whose final number is the sum; every answer goes to `demo_answers.json`;
4. evaluate: the prompt variants of `tiny-eval.yaml` on the same endpoint (`eval/`: per-case JSONL, accuracy with
   95% intervals, a bar chart);
5. search: `tiny-search.yaml` on Ray Tune, ASHA stopping weak prompt variants early, the winner scored on the
   test split (`search/`).

`python -m workloads.demo [--output-dir DIR] [--skip-serve]`; `--set key=value` overrides the
fine-tuning recipe (e.g. `--set train.max_steps=10` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workloads.common.paths import REPO_ROOT
from workloads.data.formats import prompt_messages
from workloads.kinds import load_recipe
from workloads.prompting.endpoint import Endpoint
from workloads.scoring.answers import final_number

FINETUNE_RECIPE = REPO_ROOT / "workloads/configs/tiny-lora.yaml"
EVAL_RECIPE = REPO_ROOT / "workloads/configs/tiny-eval.yaml"
SEARCH_RECIPE = REPO_ROOT / "workloads/configs/tiny-search.yaml"
SERVE_RECIPE = REPO_ROOT / "workloads/configs/serve-tiny.yaml"
ALIGN_RECIPE = REPO_ROOT / "workloads/configs/tiny-grpo.yaml"
QUESTIONS = REPO_ROOT / "workloads/bundled/arithmetic_test.jsonl"
# The demo's SFT stops early (tiny-lora.yaml's full 60 steps get about 9 in 10 held-out sums right, leaving GRPO
# nothing to show); `--set train.max_steps=60` gives the recipe's own run.
SFT_STEPS = ["train.max_steps=8", "train.warmup_steps=2"]


def finetune_stage(output_dir: Path, overrides: list[str], address: str | None = None) -> dict:
    """LoRA fine-tuning of the tiny model on Ray Train + DeepSpeed; returns its summary."""
    from workloads.finetune.driver import run

    recipe = load_recipe(FINETUNE_RECIPE, [*SFT_STEPS, *overrides], kind="finetune")
    print(f"[demo] 1/5 fine-tuning: {FINETUNE_RECIPE.relative_to(REPO_ROOT)} -> {output_dir}", flush=True)
    return run(recipe, output_dir=str(output_dir), address=address, overwrite=True)  # the demo reruns by design


def align_stage(adapter_dir: Path, output_dir: Path, address: str | None = None) -> dict:
    """GRPO from the fine-tuned adapter, rewarded for the right final number; returns its summary."""
    from workloads.align.run import run

    recipe = load_recipe(ALIGN_RECIPE, [f"rl.adapter={Path(adapter_dir).resolve()}"], kind="align")
    print(f"[demo] 2/5 alignment: {ALIGN_RECIPE.relative_to(REPO_ROOT)} from {adapter_dir} -> {output_dir}",
          flush=True)
    return run(recipe, output_dir=str(output_dir), address=address, overwrite=True)


def serve_stage(adapters: dict[str, Path], output_dir: Path, questions: int = 200, address: str | None = None) -> dict:
    """Serve the base model with `adapters` (fine_tuned, and aligned if there) and ask each `questions` held-out task
    questions through the openai client, a few at a time; an answer counts when its final number is the sum. Then,
    on the same endpoint, the prompt evaluation and prompt search stages. Returns the answers and the totals."""
    import openai

    from workloads.serve.deploy import serving

    key = "llmc-demo-" + secrets.token_hex(16)
    os.environ["LLMC_API_KEYS"] = key  # read by the serving driver, hashed before it reaches the cluster
    names = {"fine_tuned": "arith", "aligned": "aligned"}
    recipe = load_recipe(SERVE_RECIPE, [f"adapters.paths.{names[field]}={Path(path).resolve()}"
                                        for field, path in adapters.items()], kind="serve")
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines()[:questions]]
    models = {"base": recipe.engine.model_id,
              **{field: f"{recipe.engine.model_id}:{names[field]}" for field in adapters}}
    print(f"[demo] 3/5 serving: {SERVE_RECIPE.relative_to(REPO_ROOT)} with adapters "
          f"{', '.join(str(p) for p in adapters.values())}", flush=True)
    with serving(recipe, address=address) as url:
        client = openai.OpenAI(base_url=url, api_key=key)

        def ask(row: dict) -> dict:
            messages, _reference = prompt_messages(row, "alpaca")
            record = {"question": messages[-1]["content"], "expected": sum(map(int, row["input"].split(" + ")))}
            for field, model in models.items():
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
                record[field] = (reply.choices[0].message.content or "").strip()
            return record

        print(f"[demo] asking {len(rows)} held-out questions at {url} as {', '.join(models.values())}", flush=True)
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(ask, rows))
        totals = {f"{field}_correct": sum(final_number(a[field]) == a["expected"] for a in answers)
                  for field in models}
        _print_answers(answers[:5], list(models))
        print("[demo] held-out sums right (final number = sum): " + ", ".join(
            f"{field.replace('_', '-')} {totals[f'{field}_correct']}/{len(rows)}" for field in models), flush=True)
        cache_scope = f"demo|{adapters['fine_tuned']}|{secrets.token_hex(4)}"
        prompt_stages(Endpoint(url, key, recipe.engine.model_id, cache_scope), output_dir, address)
    return {"questions": len(rows), **totals, "scoring": "final number of the answer equals the sum",
            "answers": answers}


def prompt_stages(endpoint: Endpoint, output_dir: Path, address: str | None = None) -> None:
    """Stages 3 and 4 on the served endpoint: prompt variants evaluated, then searched on Ray Tune."""
    from workloads.prompting import harness
    from workloads.search import prompts as search

    print(f"[demo] 4/5 evaluating prompt variants: {EVAL_RECIPE.relative_to(REPO_ROOT)}", flush=True)
    summary = harness.run(load_recipe(EVAL_RECIPE, kind="eval"), output_dir / "eval", endpoint=endpoint, show=False)
    scores = ", ".join(f"{r['variant']} {r['accuracy']:.2f}" for r in summary["variants"])
    print(f"[demo] accuracy on {summary['cases']} questions: {scores} -> {output_dir / 'eval'}", flush=True)
    print(f"[demo] 5/5 prompt search on Ray Tune: {SEARCH_RECIPE.relative_to(REPO_ROOT)}", flush=True)
    found = search.run(load_recipe(SEARCH_RECIPE, kind="prompt_search"), output_dir / "search", address=address,
                       endpoint=endpoint, show=False)
    print(f"[demo] {found['variants']} variants, {found['stopped_early']} stopped early by ASHA; winner "
          f"{found['best_variant']}: dev {found['best_dev_accuracy']:.2f}, test {found['best_test_accuracy']:.2f} "
          f"-> {output_dir / 'search'}", flush=True)


def _print_answers(answers: list[dict], fields: list[str]) -> None:
    """The first answers as a table: the operands, the sum, each model's reply marked right or wrong."""
    def cell(record: dict, field: str) -> str:
        mark = "ok" if final_number(record[field]) == record["expected"] else "--"
        return f"{mark} {record[field][:24]!r:<28}"

    print(f"[demo] {'question':>9} {'sum':>4}  " + " ".join(f"{f.replace('_', '-'):<31}" for f in fields).rstrip())
    for record in answers:
        print(f"[demo] {record['question'].splitlines()[-1]:>9} {record['expected']:>4}  "
              + " ".join(cell(record, f) for f in fields).rstrip())


def main(argv: list[str] | None = None) -> int:
    from cluster.stopping import stop_on_sigterm
    from workloads.common.entrypoint import output_options, report_interrupt, set_output

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[output_options()])
    parser.add_argument("--output-dir", default="runs/demo", help="fine-tuning run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the fine-tuning recipe (repeatable)")
    parser.add_argument("--skip-serve", action="store_true", help="stop after fine-tuning (and alignment)")
    parser.add_argument("--skip-align", action="store_true", help="serve the fine-tuned adapter without aligning it")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: embedded)")
    args = parser.parse_args(argv)
    set_output(getattr(args, "verbose", False))
    if args.address is None:
        os.environ.pop("RAY_ADDRESS", None)  # the demo runs on its own embedded Ray
    out = Path(args.output_dir).resolve()
    from cluster import runtime

    stop_on_sigterm()  # Ctrl-C's path; cluster.runtime renews it after ray.init
    try:
        summary = finetune_stage(out, args.overrides, args.address)
        adapters = {"fine_tuned": Path(summary["artifact"])}
        aligned = None if args.skip_align else align_stage(adapters["fine_tuned"], out / "align", args.address)
        if aligned is not None:
            adapters["aligned"] = Path(aligned["artifact"])
        tally = None if args.skip_serve else serve_stage(adapters, out, address=args.address)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (taking the same path): stopped cleanly, not finished
        return report_interrupt(exc, "[demo]")
    finally:
        runtime.shutdown()  # the embedded Ray and every process it started
    if tally is not None:
        (out / "demo_answers.json").write_text(json.dumps(tally, indent=2))
    print(f"\n[demo] eval loss {summary['initial_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f} "
          f"in {summary['steps']} steps, {summary['tokens_per_second']:.0f} tokens/s")
    if aligned is not None:
        print(f"[demo] GRPO: held-out exact answers {aligned['initial_mean_reward']:.3f} -> "
              f"{aligned['final_mean_reward']:.3f} in {aligned['iterations']} iterations, KL {aligned['final_kl']:.2f}")
    print(f"[demo] results in {out}: summary.json, metrics.csv, loss_curve.png, adapter/ (PEFT), recipe.yaml, "
          "align/, demo_answers.json, eval/, search/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
