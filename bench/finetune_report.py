"""Tables, Markdown, the "Reading" notes, the README's sentences and the plot for `bench.finetune_bench` results.

Every sentence here is computed from a results file (`finetune.json`); older files lack the later rows (real
DDP, cadence timing, ZeRO-2 variants) and read as "not measured in this run".
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

TARGET = 1.25  # the bound on platform step time, in plain-loop steps
DISTURBED = 1.5  # a plain-loop run this many times slower than the median plain run was disturbed


def shipped_layouts() -> dict[tuple[bool, int, int, int], list[str]]:
    """(deepspeed, stage or 0, workers, cpus per worker) -> the shipped CPU fine-tuning recipes (tiny-*.yaml)
    that run in that layout."""
    import yaml

    from workloads.common.paths import REPO_ROOT
    from workloads.kinds import load_recipe

    out: dict[tuple[bool, int, int, int], list[str]] = {}
    for path in sorted((REPO_ROOT / "workloads" / "configs").glob("tiny-*.yaml")):
        if yaml.safe_load(path.read_text()).get("kind") != "finetune":
            continue
        recipe = load_recipe(str(path), [], kind="finetune")
        ds, scaling = recipe.deepspeed, recipe.scaling
        key = (ds.enabled, ds.stage if ds.enabled else 0, scaling.num_workers, scaling.cpus_per_worker)
        out.setdefault(key, []).append(path.name)
    return out


def _shipped_by(layout: dict[str, Any]) -> list[str]:
    if "shipped_by" in layout:
        return layout["shipped_by"]
    key = (layout["deepspeed"], layout["stage"] if layout["deepspeed"] else 0, layout["workers"],
           layout["cpus_per_worker"])
    return shipped_layouts().get(key, [])  # a results file older than the field: today's recipes


def layout_label(layout: dict[str, Any], shipped: bool = True) -> str:
    """How a platform layout reads in tables: backend, workers and CPUs each, and the recipes that ship it.
    One worker without DeepSpeed is not DDP: `Strategy` wraps the model in DDP only with several workers."""
    workers, cpus = layout["workers"], layout["cpus_per_worker"]
    size = f"{workers} worker{'s' if workers > 1 else ''} x {cpus} CPU"
    if layout["deepspeed"]:
        text = f"DeepSpeed ZeRO-{layout['stage']}, {size}"
    elif workers > 1:
        text = f"DDP, {size}"
    else:
        text = f"Ray Train, {size}, no DDP wrapper"
    recipes = _shipped_by(layout) if shipped else []
    return text + (f" (shipped layout: {', '.join(recipes)})" if recipes else "")


def profile_summary(profile: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Median of every timed phase (seconds) over the steps after the first `warmup`."""
    kept = profile[warmup:] or profile
    keys = sorted({k for row in kept for k, v in row.items() if v is not None})
    return {k: statistics.median(row[k] for row in kept if row.get(k) is not None) for k in keys}


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _ok(entries: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entries.items() if "error" not in v}


def _cadence_text(results: dict[str, Any]) -> str:
    c = results["settings"].get("cadence")
    if not c:
        return "the bench's old cadence (one report, eval and checkpoint, at the end)"
    return (f"a report every {c['log_every']} steps, an eval every {c['eval_every']} and a checkpoint every "
            f"{c['checkpoint_every']} ({Path(c['recipe']).name})")


OVERHEAD_HEADER = ["layout (full FT, batch 8 x 64)", "median step s", "x plain (neighbours)", "x plain (all)",
                   "s/step incl. shipped cadence", "x plain incl. cadence", "cadence s per period",
                   "steady range s", "start-up+save s", "tokens/s"]
VARIANT_HEADER = ["ZeRO-2, 2 workers: change", "optimizer that stepped", "median step s", "x plain (neighbours)",
                  "x as shipped", "forward s", "backward s", "optimizer step s", "param all-gather s",
                  "grad norm+clip s", "collectives s", "rest s"]
METHOD_HEADER = ["method (tiny Llama, ZeRO-2, 2 x 1)", "median step s", "tokens/s steady", "tokens/s all steps",
                 "x full", "start-up+save s", "final loss"]
MEMORY_HEADER = ["model", "batch", "method", "lifetime peak MiB", "load peak MiB", "fp32 file mapped after load MiB",
                 "train peak MiB", "train peak above import MiB", "weights MiB", "frozen dtype", "step s"]


def overhead_rows(results: dict[str, Any]) -> list[list[str]]:
    plain = results["plain"]
    if plain.get("median_s") is None:
        return []
    medians = " / ".join(_fmt(m) for m in plain["run_medians_s"])
    rows = [["plain torch loop, 1 process x 2 threads", _fmt(plain["median_s"]), "1.00", "1.00", "-", "-", "-",
             f"run medians {medians}", "-", _fmt(plain["tokens_per_second"], ".0f")]]
    for entry in results["layouts"].values():
        label = layout_label(entry["layout"])
        if "error" in entry:
            rows.append([label, "failed", *["-"] * 7, entry["error"][:80]])
            continue
        s, c = entry["steady"], entry.get("cadence") or {}
        rows.append([label, _fmt(s["median_s"]), _fmt(entry["ratio_vs_neighbour_plain"]), _fmt(entry["ratio_vs_plain"]),
                     _fmt(c.get("seconds_per_step")), _fmt(c.get("ratio_vs_neighbour_plain")),
                     _fmt(c.get("cadence_seconds_per_period"), ".1f"), f"{s['min_s']:.2f}-{s['max_s']:.2f}",
                     _fmt(entry["startup_seconds"], ".1f"), _fmt(entry["tokens_per_second_steady"], ".0f")])
    return rows


def _split(profile: dict[str, float]) -> dict[str, float | None]:
    """A profiled ZeRO step in parts (s): DeepSpeed's forward / backward / step timers, ZeRO's optimizer phases,
    the comms logger's collectives, and what none of them covers."""
    parts = {"forward": profile.get("fwd"), "backward": profile.get("bwd"), "optimizer": profile.get("optimizer_step"),
             "allgather": profile.get("optimizer_allgather"), "gradients": profile.get("optimizer_gradients"),
             "collectives": profile.get("collectives_s")}
    timed = [profile.get(k) for k in ("fwd", "bwd", "step")]
    parts["rest"] = profile["step_s"] - sum(timed) if "step_s" in profile and None not in timed else None
    return parts


def _shipped_variant(runs: dict[str, Any]) -> dict[str, Any] | None:
    """The variant run that changes nothing (the shipped optimizer and threads), if it ran."""
    return next((v for v in _ok(runs).values() if not v["variant"]["ds_config"] and not v["variant"]["overrides"]
                 and v["variant"]["cpus_per_worker"] == 1), None)


def variant_rows(results: dict[str, Any]) -> list[list[str]]:
    runs = (results.get("variants") or {}).get("runs") or {}
    if not runs:
        return []
    plain = results["plain"]
    rows = [["plain torch loop, 1 process x 2 threads", "torch AdamW", _fmt(plain["median_s"]), "1.00", "-",
             f"{_fmt(plain.get('forward_backward_median_s'))} (with backward)", "-",
             f"{_fmt(plain.get('optimizer_median_s'))} (clip + AdamW)", "-", "-", "-", "-"]]
    shipped = _shipped_variant(runs)
    for entry in runs.values():
        label = entry["variant"]["label"]
        if "error" in entry:
            rows.append([label, "failed", *["-"] * 9, entry["error"][:80]])
            continue
        split = _split(entry["profile_median"])
        median = entry["steady"]["median_s"]
        vs_shipped = median / shipped["steady"]["median_s"] if shipped else None
        rows.append([label, entry.get("optimizer") or "-", _fmt(median), _fmt(entry["ratio_vs_neighbour_plain"]),
                     _fmt(vs_shipped), *(_fmt(split[k]) for k in ("forward", "backward", "optimizer", "allgather",
                                                                  "gradients", "collectives", "rest"))])
    return rows


def method_rows(results: dict[str, Any]) -> list[list[str]]:
    runs = results["methods"]["runs"]
    full = runs.get("full", {}).get("tokens_per_second_steady")
    rows = []
    for method in ("full", "lora", "qlora"):
        entry = runs.get(method)
        if entry is None:
            continue
        if "error" in entry:
            rows.append([method, "failed", "-", "-", "-", "-", entry["error"][:80]])
            continue
        tps = entry["tokens_per_second_steady"]
        rows.append([method, _fmt(entry["steady"]["median_s"], ".3f"), _fmt(tps, ".0f"),
                     _fmt(entry["tokens_per_second_all_steps"], ".0f"), _fmt(tps / full if full else None),
                     _fmt(entry["startup_seconds"], ".1f"), _fmt(entry["final_loss"], ".3f")])
    return rows


def memory_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in results["memory"]:
        head = [m["model"], str(m["micro_batch"]), m["variant"] + (" + grad ckpt" if m.get("checkpointing") else "")]
        if "error" in m:
            rows.append([*head, "failed", m["error"][:80], *["-"] * 6])
            continue
        steps = m["step_seconds"]
        rows.append([*head, _fmt(m["peak_rss_mib"], ".0f"), _fmt(m["peak_load_mib"], ".0f"),
                     _fmt(m["mapped_weights_after_load_mib"], ".0f"), _fmt(m["peak_train_mib"], ".0f"),
                     _fmt(m["peak_train_mib"] - m["rss_after_import_mib"], ".0f"), _fmt(m["weights_mib"], ".0f"),
                     ",".join(m["frozen_param_dtypes"]), _fmt(statistics.median(steps) if steps else None)])
    return rows


RATIO_HEADER = ["model", "batch", "QLoRA variant", "train peak", "train peak above import", "lifetime peak", "weights"]


def ratio_rows(results: dict[str, Any]) -> list[list[str]]:
    return [[r["model"], str(r["micro_batch"]), r["variant"], _fmt(r["train_peak"]),
             _fmt(r["train_peak_above_import"]), _fmt(r["lifetime_peak"]), _fmt(r["weights"])]
            for r in results["memory_ratios"]]


def sections(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    return [("Platform overhead vs a plain torch loop", OVERHEAD_HEADER, overhead_rows(results)),
            ("ZeRO-2, 2 workers: optimizer and threads", VARIANT_HEADER, variant_rows(results)),
            ("Throughput per method", METHOD_HEADER, method_rows(results)),
            ("Peak memory per method", MEMORY_HEADER, memory_rows(results)),
            ("QLoRA / LoRA memory ratios", RATIO_HEADER, ratio_rows(results))]


def print_tables(results: dict[str, Any], results_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220)
    for title, header, rows in sections(results):
        if not rows:
            continue
        table = Table(title=title)
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"fastest platform layout: {results['winner']}; results in {results_dir}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(not measured in this run)"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _model_text(settings: dict[str, Any]) -> str:
    model = settings.get("overhead_model") or settings["models"]["85M"]
    shape = f"{model['num_layers']} layers x {model['hidden_size']}, fp32, from the tiny-model factory"
    if model == settings["models"]["85M"]:
        return f"One 85M-parameter Llama ({shape})"
    return f"The tiny Llama ({shape}; `--quick`: a check that the rows run, not a measurement)"


def _platform_text(results: dict[str, Any]) -> str:
    settings, c = results["settings"], results["settings"].get("cadence")
    if not c:
        return (f"Platform rows run `workloads.finetune.run` (what `llmc finetune` runs) for {settings['steps']} "
                "steps, reporting and checkpointing once, at the end, with no eval set: this run predates the cadence "
                "columns.")
    first = settings["warmup"] + 1
    return (f"Platform rows run `workloads.finetune.run` (what `llmc finetune` runs) for {settings['steps']} steps at "
            f"the shipped cadence, {_cadence_text(results)}, with the shipped eval set. \"s/step incl. shipped "
            f"cadence\" is rank 0's wall time from the end of step {first - 1} to the end of step "
            f"{first - 1 + c['period']}, over {c['period']}: one whole period of steps with its reports, eval and "
            "checkpoint; \"cadence s per period\" is that wall time less the steps' own. The last step's checkpoint "
            "(which also exports the model) and the initial eval are in \"start-up+save\".")


def _variant_text(results: dict[str, Any], table: str) -> str:
    if not (results.get("variants") or {}).get("runs"):
        return "Not measured in this run."
    steps = results["settings"]["variant_steps"]
    return f"""The shipped LoRA layout with the same model and batch, {steps} steps each \
(one report and checkpoint, at the end, no eval), each run the shipped recipe with one change. \
`workloads.finetune.plan.deepspeed_config` sets `torch_adam: true` for every recipe (with \
`deepspeed.offload_optimizer` too), so no recipe field reaches DeepSpeed's own Adam: the bench merges the optimizer \
keys into the DeepSpeed config inside the workers (bench-only, `bench/_instrument.py`): `fused: true` (torch's fused \
CPU AdamW), `torch_adam: false` (DeepSpeed's FusedAdam, built on the CPU accelerator from its CPU Adam kernel; with \
`deepspeed.offload_optimizer: true`, DeepSpeedCPUAdam). "2 threads per worker" is `scaling.cpus_per_worker: 2` (4 \
torch threads on the 2 cores). Phases are rank 0's medians from DeepSpeed's own timers (`wall_clock_breakdown`): \
forward, backward (the gradient reduce runs inside it), and in the engine step ZeRO's optimizer step, parameter \
all-gather and gradient norm/clip; "collectives" is the comms logger's time in all collectives (waiting for the \
other rank included; it overlaps the phases); "rest" is the step less forward, backward and engine step.

{table}
"""


def _disturbed_text(results: dict[str, Any]) -> str:
    medians = results["plain"]["run_medians_s"]
    typical = statistics.median(medians)
    slow = [f"run {i + 1}, {m:.2f} s against {typical:.2f} s" for i, m in enumerate(medians) if m > DISTURBED * typical]
    return "; ".join(slow) if slow else "none in this run"


def write_markdown(results: dict[str, Any], notes: str, path: Path) -> None:
    machine, settings = results["machine"], results["settings"]
    overhead, variants, methods, memory, ratios = (markdown_table(h, r) for _, h, r in sections(results))
    partial = f" (`--only {','.join(settings['only'])}`)" if settings.get("only") else ""
    text = f"""# Fine-tuning benchmark

`python -m bench.finetune_bench` (`make bench`){partial}, run {results['started']} to {results['finished']},
{machine['cpus']} CPUs, Python {machine['python']}. Load average (1 min) {machine['load_average_at_start']:.1f}
at start, {machine['load_average_at_end']:.1f} at end: **the machine is shared with other work, so every
timing here is a single noisy run** (per-run load averages are in `finetune.json`, with every step time).

## Platform overhead: Ray Train step time against a plain torch loop

{_model_text(settings)}, full fine-tuning, the same packed data,
global batch {settings['global_batch']} x {settings['seq_len']} tokens, AdamW with grad clipping.
{_platform_text(results)}
The plain loop (one process, `torch.set_num_threads(2)`, same batches as rank 0 of a 1-worker run) runs
{settings['plain_steps']} steps before the first platform run and again after each one. Medians leave out the
first {settings['warmup']} steps.
"x plain (neighbours)" divides by the mean of the plain runs just before and after that run (drift-corrected),
leaving out a neighbour more than {DISTURBED}x slower than the median plain run (disturbed: {_disturbed_text(results)});
"x plain (all)" by the median over all plain steps. "start-up+save" is wall time minus the steps: worker
group start, data and model load, DeepSpeed init and the final checkpoint. One worker without DeepSpeed is
not DDP: `workloads.finetune.strategy.Strategy` wraps the model in DDP only when there are several workers. Starting
embedded Ray took {results.get('ray_init_seconds', 0):.1f} s, once, not counted in any row.

{overhead}

## ZeRO-2 on 2 workers x 1 CPU: optimizer and threads

{_variant_text(results, variants)}

## Throughput per method (tiny Llama, same {settings['method_steps']} steps, the shipped layout)

{methods}

## Peak memory per method

One fresh process per row, plain PyTorch through the project's `load_model` / `attach_lora`, AdamW on the
trainable parameters. "lifetime peak" is `ru_maxrss`. "load peak" is the peak while loading (quantization
included). "fp32 file mapped after load": `from_pretrained` leaves weights memory-mapped from the
safetensors file; for QLoRA the unquantized tensors (embeddings, norms, lm_head) keep the whole mapping
alive and the pages read while quantizing stay resident (clean page cache: counted in RSS, reclaimable).
The probe then copies every tensor still backed by the file into private memory (the mapping goes), hands
freed heap back to the OS (`malloc_trim`: quantizing leaves fp32 temporaries in glibc's heap), resets
the peak (`/proc/self/clear_refs`) and trains: "train peak" is what each method holds while training,
"above import" subtracts the RSS after importing torch, transformers, peft and bitsandbytes (~630 MiB).

{memory}

QLoRA / LoRA:

{ratios}

## Reading

{notes}
"""
    path.write_text(text)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(17, 10))
    axes = axes.ravel()
    ok = _ok(results["layouts"])
    plain = results["plain"]["median_s"] or 0.0
    names = ["plain", *ok]
    axes[0].bar([x - 0.2 for x in range(len(names))], [plain, *(v["steady"]["median_s"] for v in ok.values())],
                width=0.4, color="tab:blue", label="median step")
    axes[0].bar([x + 0.2 for x in range(len(names))],
                [plain, *((v.get("cadence") or {}).get("seconds_per_step") or 0 for v in ok.values())],
                width=0.4, color="tab:cyan", label="per step incl. shipped cadence")
    axes[0].axhline(plain * TARGET, color="red", linestyle="--", label=f"{TARGET} x plain")
    axes[0].set_xticks(range(len(names)), names, rotation=30)
    axes[0].set(ylabel="s", title="full FT, batch 8 x 64: layouts")
    axes[0].legend()
    variants = _ok((results.get("variants") or {}).get("runs") or {})
    axes[1].bar(["plain", *variants], [plain, *(v["steady"]["median_s"] for v in variants.values())],
                color=["grey", *["tab:purple"] * len(variants)])
    axes[1].axhline(plain * TARGET, color="red", linestyle="--", label=f"{TARGET} x plain")
    axes[1].set(ylabel="median step s", title="ZeRO-2, 2 workers: optimizer and threads")
    axes[1].tick_params(axis="x", rotation=20, labelsize=8)
    axes[1].legend()
    runs = {k: v for k, v in results["methods"]["runs"].items() if "steady" in v}
    axes[2].bar(list(runs), [v["tokens_per_second_steady"] for v in runs.values()], color="tab:green")
    axes[2].set(ylabel="tokens/s (steady)", title="tiny Llama, ZeRO-2, 2 x 1")
    memory = [m for m in results["memory"] if "error" not in m]
    labels = [f"{m['model']} b{m['micro_batch']}\n{m['variant']}" for m in memory]
    axes[3].bar(labels, [m["peak_train_mib"] for m in memory], color="tab:orange", label="train peak")
    axes[3].bar(labels, [m["rss_after_import_mib"] for m in memory], color="tab:grey", label="after imports")
    axes[3].set(ylabel="MiB", title="peak RSS while training")
    axes[3].tick_params(axis="x", labelsize=7, rotation=45)
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}x"


def _layout_note(layout: dict[str, Any]) -> str:
    if layout["deepspeed"]:
        return ""
    if layout["workers"] == 1:
        return " (one worker: nothing to all-reduce, so `Strategy` wraps nothing in DDP; Ray Train and the loop only)"
    return " (real DDP: every gradient all-reduced over gloo)"


def _layout_notes(results: dict[str, Any], target: float) -> list[str]:
    lines = []
    layouts = _ok(results["layouts"])
    if results["winner"] in layouts:
        best = layouts[results["winner"]]
        lines.append(f"- Fastest platform layout in this run: **{layout_label(best['layout'])}**, "
                     f"{best['steady']['median_s']:.2f} s/step, {best['ratio_vs_neighbour_plain']:.2f}x the plain "
                     f"loop beside it (target: at most {target}x).")
    for entry in layouts.values():
        layout, ratio, c = entry["layout"], entry["ratio_vs_neighbour_plain"], entry.get("cadence")
        verdict = "meets" if ratio <= target else "misses"
        line = (f"- {layout_label(layout)}{_layout_note(layout)}: {ratio:.2f}x the plain loop, {verdict} the "
                f"{target}x target")
        if c:
            line += (f"; with the shipped cadence {c['seconds_per_step']:.2f} s/step, "
                     f"{c['ratio_vs_neighbour_plain']:.2f}x ({c['cadence_seconds_per_period']:.1f} s of every "
                     f"{results['settings']['cadence']['period']} steps go to reports, the eval and the checkpoint)")
        lines.append(line + ".")
    single = next((v for v in layouts.values() if not v["layout"]["deepspeed"] and v["layout"]["workers"] == 1), None)
    ddp = next((v for v in layouts.values() if not v["layout"]["deepspeed"] and v["layout"]["workers"] > 1), None)
    if single and ddp:
        lines.append(f"- Real DDP ({layout_label(ddp['layout'], shipped=False)}) steps at "
                     f"{ddp['steady']['median_s'] / single['steady']['median_s']:.2f}x the one-worker run without a "
                     "DDP wrapper: what splitting the batch over two 1-thread processes and all-reducing every "
                     "gradient costs or saves here.")
    elif single:
        lines.append("- No real DDP layout in this run: the one-worker row has no DDP wrapper and no all-reduce.")
    return lines


def _variant_notes(results: dict[str, Any], target: float) -> list[str]:
    runs = (results.get("variants") or {}).get("runs") or {}
    ok = _ok(runs)
    if not ok:
        return ["- ZeRO-2 optimizer and thread variants: not measured in this run."]
    lines = []
    shipped = _shipped_variant(runs)
    if shipped:
        lines.append(f"- ZeRO-2, 2 workers x 1 CPU, {shipped['variant']['label']} ({shipped.get('optimizer')}): "
                     f"{shipped['steady']['median_s']:.2f} s/step, {shipped['ratio_vs_neighbour_plain']:.2f}x the "
                     "plain loop. Each change against it:")
    for entry in ok.values():
        if entry is shipped:
            continue
        median, label = entry["steady"]["median_s"], entry["variant"]["label"]
        line = (f"- {label} ({entry.get('optimizer')} stepped): {median:.2f} s/step, "
                f"{entry['ratio_vs_neighbour_plain']:.2f}x the plain loop")
        if shipped:
            before, after = _split(shipped["profile_median"])["optimizer"], _split(entry["profile_median"])["optimizer"]
            line += f", {median - shipped['steady']['median_s']:+.2f} s/step against as shipped"
            if before is not None and after is not None:
                line += f"; ZeRO's optimizer step {before:.2f} s -> {after:.2f} s"
        lines.append(line + ".")
    for entry in runs.values():
        if "error" in entry:
            lines.append(f"- {entry['variant']['label']}: failed ({entry['error'][:120]}).")
    best = min(ok.values(), key=lambda v: v["steady"]["median_s"])
    plain = statistics.fmean(best["plain_neighbours_s"])
    if best["ratio_vs_neighbour_plain"] <= target:
        lines.append(f"- The {target}x target is met by {best['variant']['label']}: "
                     f"{best['ratio_vs_neighbour_plain']:.2f}x the plain loop.")
        return lines
    lines.append(_why_missed(best, plain, results["plain"], target))
    return lines


def _why_missed(best: dict[str, Any], plain: float, plain_run: dict[str, Any], target: float) -> str:
    """Why the fastest ZeRO-2 variant misses the target, from its phase split and the plain loop's."""
    budget, median = target * plain, best["steady"]["median_s"]
    split = _split(best["profile_median"])
    text = (f"- The {target}x target ({budget:.2f} s/step beside a {plain:.2f} s plain step) is out of reach for "
            f"ZeRO-2 on 2 workers x 1 CPU here: the fastest variant, {best['variant']['label']}, takes {median:.2f} s "
            f"({best['ratio_vs_neighbour_plain']:.2f}x).")
    if split["forward"] is None or split["backward"] is None:
        return text + " (No phase split was recorded for it.)"
    text += (f" Rank 0's median step: forward {split['forward']:.2f} s, backward {split['backward']:.2f} s, "
             f"optimizer {_fmt(split['optimizer'])} s, parameter all-gather {_fmt(split['allgather'])} s, grad "
             f"norm+clip {_fmt(split['gradients'])} s, rest {_fmt(split['rest'])} s")
    if plain_run.get("forward_backward_median_s") is not None:
        text += (f"; the plain loop's (medians over all its runs): forward+backward "
                 f"{plain_run['forward_backward_median_s']:.2f} s, clip + AdamW "
                 f"{plain_run['optimizer_median_s']:.2f} s")
    collectives = split["collectives"]
    if collectives is None:
        return text + "."
    left = median - collectives
    text += (f". {collectives:.2f} s of the ZeRO-2 step is spent in collectives (waiting for the other rank "
             f"included); without any it would take {left:.2f} s ({left / plain:.2f}x)")
    if left <= budget:
        return text + f", within the budget: communication ({collectives:.2f} s) is what misses the target."
    if split["optimizer"] is None:
        return text + ", still above the budget: faster communication alone cannot reach the target."
    compute = left - split["optimizer"]
    if compute > budget:
        return text + (f"; without the optimizer step too, {compute:.2f} s ({compute / plain:.2f}x), still above the "
                       "budget: neither faster communication nor a faster optimizer reaches the target on this "
                       "CPU, because what is left (forward and backward on two 1-thread workers with half the "
                       "batch each, and the rest, collectives excluded) already takes longer than the whole budget.")
    return text + (f"; without the optimizer step too, {compute:.2f} s ({compute / plain:.2f}x): within the budget "
                   f"only if both the collectives and the optimizer step ({split['optimizer']:.2f} s) go.")


def auto_notes(results: dict[str, Any], target: float = TARGET) -> str:
    """The reading of a run, computed from its results alone: every number here is in the tables above."""
    lines = [*_layout_notes(results, target), *_variant_notes(results, target)]
    runs = results["methods"]["runs"]
    if all("error" not in runs.get(m, {"error": 1}) for m in ("full", "lora", "qlora")):
        full, lora, q = (runs[m]["tokens_per_second_steady"] for m in ("full", "lora", "qlora"))
        lines.append(f"- Tokens/s on the tiny model: LoRA {lora / full:.2f}x of full fine-tuning; QLoRA "
                     f"{q / full:.2f}x of full and {q / lora:.2f}x of LoRA.")
    ratios = results.get("memory_ratios") or []
    if ratios:
        lifetime = [r["lifetime_peak"] for r in ratios]
        above = sum(v >= 1 for v in lifetime)
        spans = {key: _span([r[key] for r in ratios]) for key in ("weights", "train_peak", "train_peak_above_import")}
        lines.append(f"- QLoRA / LoRA memory: weights {spans['weights']}, train peak {spans['train_peak']} "
                     f"({spans['train_peak_above_import']} above the import baseline), lifetime peak "
                     f"{_span(lifetime)}: at or above LoRA's in {above} of {len(lifetime)} cases.")
    return "\n".join(lines)


def readme_sentences(results: dict[str, Any], target: float = TARGET) -> str:
    """What the README says about fine-tuning overhead, from a `finetune.json` (rows it lacks are named as such)."""
    plain = results["plain"]["median_s"]
    layouts = _ok(results["layouts"])
    missing = []
    parts = [f"Fine-tuning (`bench/results/finetune.json`, run {results['started']}, 85M Llama, full fine-tuning, "
             f"batch 8 x 64): a plain single-process torch loop takes {plain:.2f} s per step."]
    for entry in layouts.values():
        layout = entry["layout"]
        if not _shipped_by(layout):
            continue
        c = entry.get("cadence")
        cadence = (f", {c['ratio_vs_neighbour_plain']:.2f}x with the shipped report/eval/checkpoint cadence included"
                   if c else "")
        if not c:
            missing.append(f"the step time of {layout_label(layout, shipped=False)} with the shipped cadence")
        parts.append(f"{layout_label(layout)} steps at {entry['ratio_vs_neighbour_plain']:.2f}x that{cadence}.")
    ddp = next((v for v in layouts.values() if not v["layout"]["deepspeed"] and v["layout"]["workers"] > 1), None)
    if ddp and not _shipped_by(ddp["layout"]):  # a shipped DDP layout is quoted above already
        parts.append(f"Real DDP ({layout_label(ddp['layout'], shipped=False)}) steps at "
                     f"{ddp['ratio_vs_neighbour_plain']:.2f}x.")
    elif not ddp:
        missing.append("a real 2-worker DDP layout")
    if results["winner"] in layouts:
        best = layouts[results["winner"]]
        parts.append(f"The fastest layout in that run is {layout_label(best['layout'], shipped=False)}, "
                     f"{best['ratio_vs_neighbour_plain']:.2f}x.")
    variants = _ok((results.get("variants") or {}).get("runs") or {})
    if variants:
        best = min(variants.values(), key=lambda v: v["steady"]["median_s"])
        verdict = "meeting" if best["ratio_vs_neighbour_plain"] <= target else "missing"
        parts.append(f"The fastest ZeRO-2 2 x 1 variant, {best['variant']['label']}, steps at "
                     f"{best['ratio_vs_neighbour_plain']:.2f}x, {verdict} the {target}x target (the reasons, with "
                     "each step's phases, are in `bench/results/finetune.md`).")
    else:
        missing.append("DeepSpeed's CPU Adam and thread settings under ZeRO-2")
    if missing:
        parts.append(f"Not in that run: {'; '.join(missing)} (`python -m bench.finetune_bench` measures them).")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.finetune_report [RESULTS_DIR]`: rewrite finetune.md and the plot from finetune.json."""
    import json
    import sys

    args = argv if argv is not None else sys.argv[1:]
    folder = Path(args[0]) if args else Path(__file__).parent / "results"
    results = json.loads((folder / "finetune.json").read_text())
    write_markdown(results, auto_notes(results), folder / "finetune.md")
    plot(results, folder / "finetune.png")
    print_tables(results, folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
