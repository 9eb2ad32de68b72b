"""The fine-tuning benchmark on a real model (`python -m bench.finetune_bench --model smollm2-135m`, the default).

One optimizer step of the model's shipped LoRA recipe (`smollm2-lora.yaml`) in its shipped layout, through the
platform path (`workloads.finetune.run`: Ray Train + DeepSpeed, exactly what `llmc finetune` runs), against a plain
single-process torch loop training the same adapters on the same batches: global batch 8 x 64 packed tokens, a
plain-loop run before and after the platform run (the platform's ratio is taken against their mean, as in the
layout study). Sized for a few minutes on 2 cores (REAL_STEPS); reports, evaluation and the checkpoint come once,
after the last step (no cadence timing). The layout study, the optimizer variants and the memory probes stay on the
tiny-factory models (`--model tiny`). Writes finetune.{json,md,png} into `bench/results/NAME/`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench._models import real_model_dir
from bench.finetune_bench import (
    GLOBAL_BATCH,
    LAYOUTS,
    SEQ_LEN,
    THREADS,
    WORK_DIR,
    Layout,
    _attempt,
    _summarize,
    bench_recipe,
    load_average,
    plain_between,
    platform_run,
    progress_stream,
    quiet,
    steady,
)
from bench.finetune_report import layout_label
from workloads.kinds import load_recipe

RECIPES = {"smollm2-135m": "workloads/configs/smollm2-lora.yaml"}  # each real model's shipped LoRA recipe
REAL_STEPS = {"steps": 6, "plain_steps": 4, "warmup": 1}  # platform steps, plain-loop steps, steps left out
NO_EVAL = ("eval.generate=false",)  # no eval set is kept (bench_recipe): nothing to reply to


def shipped_layout(recipe_path: str) -> Layout:
    """The layout a recipe ships (DeepSpeed stage, workers, CPUs each)."""
    recipe = load_recipe(recipe_path, [], kind="finetune")
    return Layout("shipped", recipe.deepspeed.enabled, recipe.deepspeed.stage, recipe.scaling.num_workers,
                  recipe.scaling.cpus_per_worker)


def run(model: str, steps: int, plain_steps: int, warmup: int, address: str | None) -> dict[str, Any]:
    """Plain loop, platform run on the shipped layout, plain loop again; the platform's steady step against them."""
    from cluster.runtime import connect, shutdown

    base = RECIPES[model]
    method = load_recipe(base, [], kind="finetune").train.method
    layout = shipped_layout(base)
    platform_recipe = bench_recipe(method, layout, steps, None, packed=True, extra=NO_EVAL, base=base)
    plain_recipe = bench_recipe(method, LAYOUTS[0], plain_steps, None, packed=True, extra=NO_EVAL, base=base)
    model_path = str(real_model_dir(model))
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    log, out = WORK_DIR / f"bench-{model}.log", progress_stream()
    results: dict[str, Any] = {
        "model": model, "recipe": base, "method": method, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": load_average()},
        "settings": {"global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN, "steps": steps, "plain_steps": plain_steps,
                     "warmup": warmup, "plain_threads": THREADS, "layout": asdict(layout)},
    }
    plain_runs = []
    with quiet(log):
        print(f"[bench] {model}: plain loop ({plain_steps} steps) ...", file=out, flush=True)
        plain_runs.append(plain_between(plain_recipe, model_path))
        started = time.perf_counter()
        print(connect(address), flush=True)
        results["ray_init_seconds"] = time.perf_counter() - started
        print(f"[bench] {model}: the shipped layout through llmc finetune's path ({steps} steps) ...", file=out,
              flush=True)
        entry = {**_attempt(lambda: platform_run(platform_recipe, f"{model}-shipped", address)),
                 "plain_neighbours": [0, 1]}
        shutdown()
        print(f"[bench] {model}: plain loop again ...", file=out, flush=True)
        plain_runs.append(plain_between(plain_recipe, model_path))
    for plain_run in plain_runs:
        plain_run["steady"] = steady(plain_run["step_seconds"], warmup)
    medians = [r["steady"]["median_s"] for r in plain_runs]
    plain_all = statistics.median(v for r in plain_runs for v in r["step_seconds"][warmup:])
    if "error" not in entry:
        _summarize(entry, medians, plain_all, warmup, period=steps)  # one report at the end: no cadence window
    results["plain"] = {"runs": plain_runs, "median_s": plain_all, "run_medians_s": medians,
                        "tokens_per_second": GLOBAL_BATCH * SEQ_LEN / plain_all}
    results["platform"] = {"layout": asdict(layout), **entry}
    results["machine"]["load_average_at_end"] = load_average()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return results


def _label(results: dict[str, Any]) -> str:
    return f"{layout_label(results['platform']['layout'], shipped=False)} ({Path(results['recipe']).name})"


def render(results: dict[str, Any]) -> str:
    """finetune.md for a real model, every figure from its finetune.json."""
    s, plain, entry = results["settings"], results["plain"], results["platform"]
    rows = [f"| plain single-process loop, {s['plain_threads']} torch threads ({when}) | "
            f"{r['steady']['median_s']:.2f} ({r['steady']['min_s']:.2f}-{r['steady']['max_s']:.2f}) | "
            f"{GLOBAL_BATCH * SEQ_LEN / r['steady']['median_s']:.0f} | 1.00x |"
            for when, r in zip(("before", "after"), plain["runs"], strict=True)]
    if "error" in entry:
        rows.append(f"| {_label(results)} | failed: {entry['error'][:200]} | - | - |")
        reading = "The platform run failed; see the row above."
    else:
        st = entry["steady"]
        rows.append(f"| {_label(results)}, through `llmc finetune`'s path | {st['median_s']:.2f} "
                    f"({st['min_s']:.2f}-{st['max_s']:.2f}) | {entry['tokens_per_second_steady']:.0f} | "
                    f"**{entry['ratio_vs_neighbour_plain']:.2f}x** |")
        reading = (f"The shipped layout steps at {entry['ratio_vs_neighbour_plain']:.2f}x the plain loop's time (the "
                   f"mean of the plain runs either side of it; {entry['ratio_vs_plain']:.2f}x their pooled median). "
                   f"Its start-up (Ray Train workers, model load, DeepSpeed initialization; wall minus the steps) "
                   f"took {entry['startup_seconds']:.0f} s, after {results['ray_init_seconds']:.0f} s of Ray start.")
    return (f"# Fine-tuning benchmark: {results['model']}\n\n"
            f"`python -m bench.finetune_bench --model {results['model']}` ({results['machine']['cpus']} cores, run "
            f"{results['started']}, load average {results['machine']['load_average_at_start']:.2f} -> "
            f"{results['machine']['load_average_at_end']:.2f}): {results['method']} as `{results['recipe']}` ships "
            f"it, global batch {s['global_batch']} x {s['seq_len']} packed tokens, {s['plain_steps']} steps per "
            f"plain-loop run and {s['steps']} in the platform run, the first {s['warmup']} left out of the medians; "
            f"reports, evaluation and the checkpoint once, after the last step.\n\n"
            "| path | median s/step (min-max) | tokens/s | vs plain loop |\n| --- | --- | --- | --- |\n"
            + "\n".join(rows) + f"\n\n{reading}\n\n![steps](finetune.png)\n")


def readme_sentences(results: dict[str, Any], source: str) -> str:
    """The docs' sentence about a real model's fine-tuning run, from its finetune.json at `source`."""
    s, plain, entry = results["settings"], results["plain"], results["platform"]
    text = (f"Fine-tuning (`{source}`, run {results['started']}, {results['method']}, batch {s['global_batch']} x "
            f"{s['seq_len']}): a plain single-process torch loop takes {plain['median_s']:.2f} s per step; ")
    if "error" in entry:
        return text + f"the shipped layout ({_label(results)}) failed in that run."
    return text + (f"the shipped layout ({_label(results)}) steps at {entry['ratio_vs_neighbour_plain']:.2f}x that "
                   f"({entry['steady']['median_s']:.2f} s), after {entry['startup_seconds']:.0f} s of start-up.")


def plot(results: dict[str, Any], path: Path) -> None:
    """Median seconds per step of each run, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["plain loop\n(before)", "plain loop\n(after)"]
    values = [r["steady"]["median_s"] for r in results["plain"]["runs"]]
    if "error" not in results["platform"]:
        labels.append("shipped layout\n(llmc finetune)")
        values.append(results["platform"]["steady"]["median_s"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, values, color=["gray", "gray", "tab:blue"][: len(values)])
    ax.set(ylabel="median seconds per optimizer step", title=f"{results['model']}: one {results['method']} step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], folder: Path) -> None:
    """finetune.json, .md and .png into `folder`; the table printed."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "finetune.json").write_text(json.dumps(results, indent=2))
    text = render(results)
    (folder / "finetune.md").write_text(text)
    plot(results, folder / "finetune.png")
    print(text)
