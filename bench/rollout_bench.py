"""Rollout benchmark: the vLLM engine against the policy's own `model.generate` on one batch, and the weight sync.

On the shipped PPO recipe of the model (smollm2-ppo.yaml for SmolLM2-135M-Instruct, the default; tiny-ppo.yaml for
the tiny-factory models) as one of its Train workers runs it (here in one process, without Ray or
DeepSpeed, so the phases are one worker's), for its LoRA policy (a fresh adapter, or `--adapter
DIR`) and for a fully trained policy (`train.method: full`, an engine of its own, no LoRA in it):
  throughput   the same training prompts (64 of the recipe's, chat-rendered as the RL loop renders them; 16 on
               the real model), group_size completions each, rl.max_new_tokens at most, sampled `--repeats` times by
               GenerateSampler (`model.generate`, torch threads as the loop sets them) and by VLLMSampler (the
               in-process engine, its one core as vLLM binds it): completion tokens per second of each, median over
               repeats, and their ratio (target: 3x)
  weight sync  `VLLMSampler.sync`: the LoRA adapter (save, drop the old LoRA id, load the new one), the full
               weights (save, reload in place): median of `--syncs` syncs
  iteration    one PPO iteration's phases (generation, scoring, log-probs, training, weight sync) with each kind
               of rollout, after one warm-up iteration: medians of `--iterations`
Sizes (SIZES, per model): the real model, sized for a few minutes on 2 cores, samples 16 prompts once per side, syncs
3 times and times 1 iteration of 4 prompts (16 completions); the tiny models 64 prompts, 3 rollouts, 5 syncs, 3
iterations of the recipe's size. Writes rollout.{json,md,png} into the model's results folder
(`bench._models.results_dir`); `python -m bench.rollout_bench --render [MODEL]` rewrites the Markdown and the chart
from the JSON. `python -m bench.rollout_bench [--adapter DIR] [--model smollm2-135m | tiny | small]` (small:
serve_bench's ~85M Llama, built the same way, untrained). Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench._models import DEFAULT_MODEL, REAL_MODELS, is_real, results_dir
from bench.serve_bench import MODELS

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "workloads/configs/tiny-ppo.yaml"  # the tiny-factory models
REAL_RECIPE = REPO / "workloads/configs/smollm2-ppo.yaml"  # a real model, by name
IN_PROCESS = ["scaling.num_workers=1", "deepspeed.enabled=false"]  # one worker's loop, in this process
# prompts per rollout, timed rollouts per side, syncs per policy kind, timed iterations per rollout kind, and the
# recipe fields that size an iteration
SIZES = {"prompts": 64, "repeats": 3, "syncs": 5, "iterations": 3, "iteration": []}
REAL_SIZES = {"prompts": 16, "repeats": 1, "syncs": 3, "iterations": 1, "iteration": ["rl.prompts_per_iteration=4"]}
TARGET = 3.0  # vLLM rollout tokens/s over model.generate's, on the same batch
POLICIES = {"lora": "LoRA adapter (the engine applies it per request)", "full": "full weights (no LoRA)"}
PHASES = {"generation_s": "generation", "scoring_s": "scoring", "logprobs_s": "log-probs", "training_s": "training",
          "weight_sync_s": "weight sync"}


def trainer(recipe_path: Path, overrides: list[str]):
    """An RLTrainer of the PPO recipe with `overrides`, set up as a Train worker of `llmc align` sets it up."""
    import torch

    from workloads.align.prompts import split_prompts
    from workloads.align.rl import RLTrainer
    from workloads.kinds import load_recipe
    from workloads.models.loading import resolve_model_path

    recipe = load_recipe(recipe_path, [*IN_PROCESS, *overrides], kind="align")
    torch.set_num_threads(recipe.scaling.cpus_per_worker)
    train, held_out = split_prompts(recipe.data, recipe.train.seed)
    return RLTrainer(recipe, resolve_model_path(recipe.model), train, held_out)


def throughput(sampler, model, prompt_ids: list[list[int]], group_size: int, repeats: int) -> dict:
    """Completion tokens (the stop token included) per second of `sampler` on the batch, after one warm-up call."""
    sampler.sample(model, prompt_ids[:4], group_size)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        rollout = sampler.sample(model, prompt_ids, group_size)
        seconds = time.perf_counter() - start
        runs.append({"tokens": int(rollout.response_mask.sum()), "seconds": round(seconds, 4)})
    rates = [r["tokens"] / r["seconds"] for r in runs]
    return {"runs": runs, "tokens_per_s": round(statistics.median(rates), 1)}


def compare(trainer, prompt_ids: list[list[int]], repeats: int) -> dict:
    """Both samplers on the trainer's policy and the same batch: tokens/s of each and the engine's ratio."""
    from workloads.align.rollout import GenerateSampler

    rl, model = trainer.rl, trainer.policy.model
    generate = GenerateSampler(trainer.tokenizer, rl.max_new_tokens, rl.temperature)
    sides = {"generate": throughput(generate, model, prompt_ids, rl.group_size, repeats),
             "vllm": throughput(trainer.sampler, model, prompt_ids, rl.group_size, repeats)}
    return {**sides, "ratio": round(sides["vllm"]["tokens_per_s"] / sides["generate"]["tokens_per_s"], 2)}


def sync_seconds(trainer, syncs: int) -> dict:
    """Seconds of `syncs` syncs of the trainer's policy into its engine."""
    runs = []
    for _ in range(syncs):
        start = time.perf_counter()
        trainer.sampler.sync(trainer.policy)
        runs.append(round(time.perf_counter() - start, 4))
    return {"runs_s": runs, "median_s": round(statistics.median(runs), 4)}


def iteration_phases(trainer, iterations: int) -> dict:
    """Median seconds of each phase over `iterations` PPO iterations, after a warm-up one."""
    trainer.iteration()
    rows = [trainer.iteration() for _ in range(iterations)]
    return {phase: round(statistics.median(r[phase] for r in rows), 4) for phase in PHASES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=[*REAL_MODELS, *sorted(MODELS)],
                        help="a real model by name, or a shape of the tiny-model factory (serve_bench's)")
    parser.add_argument("--adapter", help="a PEFT adapter of that model as the policy (default: a fresh LoRA)")
    parser.add_argument("--repeats", type=int, help="timed rollouts of the batch per side (default: the model's size)")
    parser.add_argument("--syncs", type=int, help="timed weight syncs per policy kind (default: the model's size)")
    parser.add_argument("--iterations", type=int, help="timed PPO iterations per rollout kind (default: the model's "
                        "size)")
    args = parser.parse_args(argv)
    real = is_real(args.model)
    recipe_path, sizes = (REAL_RECIPE, dict(REAL_SIZES)) if real else (RECIPE, dict(SIZES))
    sizes.update({k: getattr(args, k) for k in ("repeats", "syncs", "iterations") if getattr(args, k) is not None})
    shape = [] if real else [f"model.tiny.{key}={value}" for key, value in MODELS[args.model].items()]
    policy = [*shape, *sizes["iteration"], *([f"rl.adapter={args.adapter}"] if args.adapter else [])]
    load_before, started = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M:%S %Z")

    print("[bench] LoRA policy: the vLLM engine starts ...", flush=True)
    engine = trainer(recipe_path, [*policy, "rl.rollout=vllm"])
    rl = engine.rl
    prompt_ids = [ids for _, ids in engine.train_prompts[:sizes["prompts"]]]
    try:
        print(f"[bench] {len(prompt_ids)} prompts x {rl.group_size}: model.generate, then the engine", flush=True)
        sides = {"lora": compare(engine, prompt_ids, sizes["repeats"])}
        print("[bench] LoRA weight sync, then PPO iterations with each kind of rollout", flush=True)
        sync = {"lora": sync_seconds(engine, sizes["syncs"])}
        phases = {"vllm": iteration_phases(engine, sizes["iterations"])}
    finally:
        engine.sampler.close()
    phases["generate"] = iteration_phases(trainer(recipe_path, [*policy, "rl.rollout=generate"]), sizes["iterations"])
    print("[bench] fully trained policy: an engine of its own ...", flush=True)
    full = trainer(recipe_path, [*shape, "rl.rollout=vllm", "train.method=full"])
    try:
        sides["full"] = compare(full, prompt_ids, sizes["repeats"])
        sync["full"] = sync_seconds(full, sizes["syncs"])
    finally:
        full.sampler.close()

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "started": started,
        "settings": {"recipe": str(recipe_path.relative_to(REPO)), "model": args.model,
                     "policy": args.adapter or "a fresh LoRA", "prompts": len(prompt_ids),
                     "group_size": rl.group_size, "max_new_tokens": rl.max_new_tokens,
                     "temperature": rl.temperature, "torch_threads": engine.recipe.scaling.cpus_per_worker,
                     "engine_max_num_seqs": rl.engine.max_num_seqs, "repeats": sizes["repeats"],
                     "syncs": sizes["syncs"], "iterations": sizes["iterations"],
                     "iteration_completions": rl.prompts_per_iteration * rl.group_size},
        "throughput": {**sides, "target": TARGET},
        "weight_sync": sync,
        "iteration_phases_s": phases,
    }
    folder = results_dir(args.model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rollout.json").write_text(json.dumps(results, indent=2))
    write_report(results, folder)
    print(render(results))
    if real:  # the docs' real-model benchmark block quotes these results: keep it in step
        from scripts.readme_numbers import rewrite_bench_block

        rewrite_bench_block()
    return 0


def render(r: dict) -> str:
    """rollout.md, every figure from rollout.json."""
    s, t, w = r["settings"], r["throughput"], r["weight_sync"]
    rows = "".join(f"| {label} | {r['iteration_phases_s']['generate'][key]} | {r['iteration_phases_s']['vllm'][key]} "
                   f"|\n" for key, label in PHASES.items())
    return (f"# Rollout benchmark ({r['machine']}, load average {r['load_average'][0]} -> {r['load_average'][1]})\n\n"
            f"{s['prompts']} prompts x {s['group_size']} completions of at most {s['max_new_tokens']} tokens "
            f"(temperature {s['temperature']}), {s['model']} model, policy: {s['policy']}; model.generate on "
            f"{s['torch_threads']} torch thread(s), as the loop runs it. Median of {s['repeats']} rollouts.\n\n"
            f"| policy | model.generate tokens/s | vLLM engine tokens/s | ratio |\n| --- | --- | --- | --- |\n"
            + "".join(f"| {label} | {t[kind]['generate']['tokens_per_s']} | {t[kind]['vllm']['tokens_per_s']} | "
                      f"{t[kind]['ratio']}x |\n" for kind, label in POLICIES.items())
            + f"\nFor the shipped recipe's LoRA policy the engine samples **{t['lora']['ratio']}x** the tokens per "
            f"second of model.generate (target {t['target']}x).\n\n"
            f"Weight sync into the engine, median of {s['syncs']}: LoRA adapter {w['lora']['median_s']} s, full "
            f"weights {w['full']['median_s']} s.\n\n"
            f"One PPO iteration of the LoRA policy ({s['iteration_completions']} completions), seconds per phase "
            f"(median of {s['iterations']}, after a warm-up iteration):\n\n"
            f"| phase | model.generate | vLLM engine |\n| --- | --- | --- |\n{rows}\n"
            f"![phases](rollout.png)\n")


def readme_sentences(r: dict, source: str) -> str:
    """The docs' sentence about a rollout run (scripts/readme_numbers.py), from its rollout.json at `source`."""
    s, t, w = r["settings"], r["throughput"], r["weight_sync"]
    return (f"Rollouts (`{source}`), {s['prompts']} prompts x {s['group_size']} completions of at most "
            f"{s['max_new_tokens']} tokens: the vLLM engine samples {t['lora']['ratio']}x the tokens/s of "
            f"`model.generate` for the LoRA policy ({t['lora']['vllm']['tokens_per_s']} against "
            f"{t['lora']['generate']['tokens_per_s']}) and {t['full']['ratio']}x for full weights (target "
            f"{t['target']}x); weight sync into the engine {w['lora']['median_s']} s for the LoRA adapter, "
            f"{w['full']['median_s']} s for the full weights.")


def write_report(r: dict, folder: Path) -> None:
    """rollout.md and rollout.png (one stacked bar of phases per kind of rollout) from the results, into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "rollout.md").write_text(render(r))
    kinds = {"generate": "model.generate", "vllm": "vLLM engine"}
    fig, ax = plt.subplots(figsize=(6, 4))
    bottoms = [0.0] * len(kinds)
    for key, label in PHASES.items():
        heights = [r["iteration_phases_s"][kind][key] for kind in kinds]
        ax.bar(list(kinds.values()), heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set(ylabel="seconds per PPO iteration", title="One PPO iteration, by phase")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "rollout.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:  # --render [MODEL]: the tiny models' results, or MODEL's
        folder = results_dir(sys.argv[2] if len(sys.argv) > 2 else "tiny")
        write_report(json.loads((folder / "rollout.json").read_text()), folder)
        raise SystemExit(0)
    raise SystemExit(main())
