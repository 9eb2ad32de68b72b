"""`make demo`: prompting, fine-tuning and alignment of SmolLM2-135M-Instruct on embedded Ray, served side by side.

SmolLM2-135M-Instruct comes from a PyPI wheel's GGUF, converted once and cached (`llmc make-model smollm2-135m`).
1. prompt engineering: serve the base model (`smollm2-serve.yaml`: vLLM behind Ray Serve, OpenAI-compatible) and score
   the JSON-extraction prompt variants of `smollm2-eval-json.yaml` on held-out items through the `openai` client;
   then Ray Tune searches the variants on the dev split (`smollm2-search.yaml`, ASHA stopping weak ones early) and
   scores the winner on the test split;
2. fine-tuning: LoRA SFT on one-word review sentiment, a task its prompts leave weak (`smollm2-lora.yaml`: 2 Ray
   Train workers, DeepSpeed ZeRO-2), held-out accuracy before and after;
3. alignment: GRPO on 2-digit addition with the exact-answer reward (`smollm2-grpo.yaml`: rollouts and held-out
   greedy answers from a vLLM engine actor, the adapter synced into it after every update);
4. side by side: both adapters published to the running endpoint and asked the held-out items beside the base.
Every number printed is from this run and lands in `runs/demo/demo.json` (`scripts/readme_numbers.py` puts it into
the README); each stage's command is an MLflow run in `runs/demo/mlflow.db` (workloads.common.record).
`python -m workloads.demo [--output-dir DIR] [--verbose]`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from workloads.common import record as mlflow_record
from workloads.common.paths import REPO_ROOT
from workloads.data.formats import prompt_messages
from workloads.kinds import KINDS, load_recipe
from workloads.prompting.endpoint import Endpoint
from workloads.scoring import build_scorer

CONFIGS = REPO_ROOT / "workloads/configs"
SERVE_RECIPE, EVAL_RECIPE, SEARCH_RECIPE = (CONFIGS / f"smollm2-{n}.yaml" for n in ("serve", "eval-json", "search"))
SFT_RECIPE, GRPO_RECIPE = CONFIGS / "smollm2-lora.yaml", CONFIGS / "smollm2-grpo.yaml"
HELD_OUT = 100  # held-out items per task: prompt variants and SFT are scored on them, stage 4 asks each model them
# Each stage is sized so that the demo fits 20 minutes on 2 cores: 10 SFT steps of 8 reviews; GRPO's iterations,
# prompts and completion length are what its time is made of.
SFT_SET = ["train.max_steps=10", "train.eval_every=10", "train.checkpoint_every=10",
           f"eval.generate_samples={HELD_OUT}"]
# GRPO scores its held-out prompts before and after (greedy, on its own engine) on half as many: stage 4 asks the
# served adapter all HELD_OUT.
GRPO_SET = ["rl.iterations=5", "train.eval_every=5", "train.checkpoint_every=5", f"rl.eval_prompts={HELD_OUT // 2}"]
EVAL_VARIANTS = ("zero-shot", "one-shot", "three-shot")  # of smollm2-eval-json.yaml's: its role variant costs a minute
SEARCH_SET = ["dev_set.limit=40"]  # ASHA's rungs on 40 dev items, the winner on the full test split
# Stage 4, per adapter name on the endpoint: its task's held-out split, scorer and most tokens per reply.
SIDE_BY_SIDE = {"sentiment": ("sentiment_test.jsonl", {"type": "exact"}, 4),
                "addition": ("addition_test.jsonl", {"type": "final_number"}, 24)}


def prompting_stage(endpoint: Endpoint, out: Path, address: str | None) -> dict:
    """JSON-extraction prompt variants scored on held-out items, then searched on Ray Tune; returns both results."""
    print(f"[demo] 1/4 prompt variants: {EVAL_RECIPE.relative_to(REPO_ROOT)}", flush=True)
    recipe = load_recipe(EVAL_RECIPE, kind="eval")
    recipe.variants = [variant for variant in recipe.variants if variant.name in EVAL_VARIANTS]
    evaluated = KINDS["eval"].run(recipe, out / "eval", endpoint=endpoint, show=False)
    accuracy = {row["variant"]: row["accuracy"] for row in evaluated["variants"]}
    print(f"[demo] strict JSON match on {evaluated['cases']} held-out items: "
          + ", ".join(f"{name} {value:.0%}" for name, value in accuracy.items()), flush=True)
    print(f"[demo]     Ray Tune + ASHA over the variants: {SEARCH_RECIPE.relative_to(REPO_ROOT)}", flush=True)
    found = KINDS["prompt_search"].run(load_recipe(SEARCH_RECIPE, SEARCH_SET, kind="prompt_search"), out / "search",
                                       address=address, endpoint=endpoint, show=False)
    print(f"[demo] {found['variants']} variants, {found['stopped_early']} stopped early; winner "
          f"{found['best_variant']}: dev {found['best_dev_accuracy']:.0%}, test {found['best_test_accuracy']:.0%}",
          flush=True)
    return {"cases": evaluated["cases"], "accuracy": accuracy, "zero_shot": accuracy["zero-shot"],
            "search": {k: found[k] for k in ("variants", "stopped_early", "best_variant", "best_dev_accuracy",
                                             "best_test_accuracy")}}


def finetune_stage(out: Path, address: str | None) -> dict:
    """LoRA SFT on one-word sentiment across 2 Ray Train workers with DeepSpeed; returns its summary."""
    print(f"[demo] 2/4 LoRA SFT: {SFT_RECIPE.relative_to(REPO_ROOT)} -> {out}", flush=True)
    summary = KINDS["finetune"].run(load_recipe(SFT_RECIPE, SFT_SET, kind="finetune"), output_dir=str(out),
                                    address=address, overwrite=True, show=False)  # the demo reruns by design
    print(f"[demo] one-word sentiment on {HELD_OUT} held-out reviews: {summary['initial_eval_exact_match']:.0%} -> "
          f"{summary['final_eval_exact_match']:.0%}; eval loss {summary['initial_eval_loss']:.3f} -> "
          f"{summary['final_eval_loss']:.3f} in {summary['steps']} steps", flush=True)
    return summary


def align_stage(out: Path, address: str | None) -> dict:
    """GRPO on 2-digit addition from the base model, rewarded for the right final number; returns its summary."""
    print(f"[demo] 3/4 GRPO: {GRPO_RECIPE.relative_to(REPO_ROOT)} -> {out}", flush=True)
    summary = KINDS["align"].run(load_recipe(GRPO_RECIPE, GRPO_SET, kind="align"), output_dir=str(out),
                                 address=address, overwrite=True, show=False)
    print(f"[demo] exact sums on {summary['held_out_prompts']} held-out prompts (greedy): "
          f"{summary['initial_mean_reward']:.0%} -> "
          f"{summary['final_mean_reward']:.0%} in {summary['iterations']} iterations, KL {summary['final_kl']:.2f}",
          flush=True)
    return summary


def side_by_side(client, base: str, adapters: dict[str, str]) -> dict:
    """Each adapter's held-out task asked of the base and of the adapter; per task the totals and every answer.

    Each model's questions go out together, the base's first: vLLM's CPU LoRA path is slower per token than the base's
    (about 2.5x here), and the base's answers should not wait in batches that carry an adapter."""
    results = {}
    for task, adapter in adapters.items():
        path, scorer_spec, max_tokens = SIDE_BY_SIDE[task]
        lines = (REPO_ROOT / "workloads/bundled" / path).read_text().splitlines()[:HELD_OUT]
        rows = [json.loads(line) for line in lines]
        asked = [prompt_messages(row, "alpaca") for row in rows]
        scorer = build_scorer(scorer_spec)
        answers = [{"question": row["input"], "expected": reference}
                   for row, (_, reference) in zip(rows, asked, strict=True)]
        for field, model in (("base", base), ("adapter", adapter)):
            ask = partial(_reply, client, model, max_tokens)
            with ThreadPoolExecutor(max_workers=32) as pool:  # the engine batches up to max_num_seqs
                replies = list(pool.map(ask, [messages for messages, _ in asked]))
            for record, reply in zip(answers, replies, strict=True):
                record[field], record[f"{field}_right"] = reply, bool(scorer.score(reply, record["expected"]))
        results[task] = {"adapter": adapter, "questions": len(answers), "scoring": scorer_spec["type"],
                         "base_correct": sum(a["base_right"] for a in answers),
                         "adapter_correct": sum(a["adapter_right"] for a in answers), "answers": answers}
    return results


def _reply(client, model: str, max_tokens: int, messages: list[dict]) -> str:
    """One held-out item asked of one model greedily: its reply."""
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return (reply.choices[0].message.content or "").strip()


def _print_side_by_side(results: dict) -> None:
    """Per task: three answers of each model (its final answer, marked right or wrong), then the totals."""
    def cell(record: dict, field: str) -> str:
        text = " ".join(record[field].split())
        text = text if len(text) <= 30 else "..." + text[-27:]  # the end holds the final answer
        return f"{'ok' if record[f'{field}_right'] else '--'} {text:<30}"

    for task, result in results.items():
        print(f"[demo] {task}: {'expected':<10} {'base':<33} {result['adapter']}")
        for record in result["answers"][:3]:
            expected = str(record["expected"]).split()[-1]  # "64 + 44 = 108" -> 108
            print(f"[demo]   {expected[:10]:<10} {cell(record, 'base')} {cell(record, 'adapter')}")
        print(f"[demo]   right of {result['questions']}: base {result['base_correct']}, "
              f"{result['adapter']} {result['adapter_correct']}", flush=True)


def run_demo(out: Path, address: str | None = None) -> dict:
    """The four stages on one endpoint that stays up throughout; returns what demo.json holds."""
    import openai

    from workloads.serve.deploy import serving

    key = "llmc-demo-" + secrets.token_hex(16)
    os.environ["LLMC_API_KEYS"] = key  # read by the serving driver, hashed before it reaches the cluster
    started, seconds = time.monotonic(), {}

    def lap(stage: str) -> None:  # seconds since the previous stage ended
        seconds[stage] = time.monotonic() - started - sum(seconds.values())

    recipe = load_recipe(SERVE_RECIPE, ["adapters.paths={}"], kind="serve")  # adapters are published as they come
    print(f"[demo] serving SmolLM2-135M-Instruct: {SERVE_RECIPE.relative_to(REPO_ROOT)}", flush=True)
    with serving(recipe, address=address) as served:
        lap("serve_start")
        endpoint = Endpoint(served.url, key, served.model_id, f"demo|{secrets.token_hex(4)}")
        prompting = prompting_stage(endpoint, out, address)
        lap("prompting")
        sft = finetune_stage(out / "sft", address)
        lap("sft")
        grpo = align_stage(out / "grpo", address)
        lap("grpo")
        adapters = {"sentiment": served.publish("sentiment", sft["artifact"]),
                    "addition": served.publish("addition", grpo["artifact"])}
        print(f"[demo] 4/4 side by side on {HELD_OUT} held-out items per task: base and "
              f"{', '.join(adapters.values())} through the openai client", flush=True)
        served_results = side_by_side(openai.OpenAI(base_url=served.url, api_key=key), served.model_id, adapters)
        lap("side_by_side")
    _print_side_by_side(served_results)
    return {"model": "smollm2-135m", "held_out": HELD_OUT, "prompting": prompting,
            "sft": {k: sft[k] for k in ("steps", "initial_eval_exact_match", "final_eval_exact_match",
                                        "initial_eval_loss", "final_eval_loss", "artifact")},
            "grpo": {k: grpo[k] for k in ("iterations", "held_out_prompts", "initial_mean_reward", "final_mean_reward",
                                          "final_kl", "artifact")},
            "served": served_results, "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def main(argv: list[str] | None = None) -> int:
    from cluster.stopping import stop_on_sigterm
    from workloads.common.entrypoint import output_options, report_interrupt, set_output

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[output_options()])
    parser.add_argument("--output-dir", default="runs/demo", help="where every stage writes (demo.json at its top)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: embedded)")
    args = parser.parse_args(argv)
    set_output(getattr(args, "verbose", False))
    if args.address is None:
        os.environ.pop("RAY_ADDRESS", None)  # the demo runs on its own embedded Ray
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from cluster import runtime

    stop_on_sigterm()  # Ctrl-C's path; cluster.runtime renews it after ray.init
    started = time.monotonic()
    try:
        result = run_demo(out, args.address)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (taking the same path): stopped cleanly, not finished
        return report_interrupt(exc, "[demo]")
    finally:
        runtime.shutdown()  # the embedded Ray and every process it started
    result["seconds"]["total"] = round(time.monotonic() - started, 1)
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    print(f"[demo] done in {result['seconds']['total'] / 60:.1f} min; results in {out}: demo.json, eval/, search/, "
          "sft/ (adapter, loss curve), grpo/ (adapter, reward and KL curves)")
    if mlflow_record.enabled():  # each stage is an MLflow run (workloads.common.record)
        print(f"[demo] its MLflow runs: mlflow ui --backend-store-uri {mlflow_record.tracking_uri(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
