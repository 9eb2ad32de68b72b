"""Tables, Markdown, JSON notes and the plot for `bench.finetune_bench` results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def layout_label(layout: dict[str, Any]) -> str:
    """How a platform layout of the results file reads in tables: backend, workers and CPUs each."""
    backend = f"DeepSpeed ZeRO-{layout['stage']}" if layout["deepspeed"] else "DDP"
    return f"{backend}, {layout['workers']} worker(s) x {layout['cpus_per_worker']} CPU"


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


OVERHEAD_HEADER = ["layout (85M Llama, batch 8 x 64, full FT)", "median step s", "x plain (neighbours)",
                   "x plain (all)", "steady range s", "start-up+save s", "tokens/s"]
METHOD_HEADER = ["method (tiny Llama, ZeRO-2, 2 x 1)", "median step s", "tokens/s steady", "tokens/s all steps",
                 "x full", "start-up+save s", "final loss"]
MEMORY_HEADER = ["model", "batch", "method", "lifetime peak MiB", "load peak MiB", "fp32 file mapped after load MiB",
                 "train peak MiB", "train peak above import MiB", "weights MiB", "frozen dtype", "step s"]


def overhead_rows(results: dict[str, Any]) -> list[list[str]]:
    plain = results["plain"]
    medians = " / ".join(_fmt(m) for m in plain["run_medians_s"])
    rows = [["plain torch loop, 1 process x 2 threads", _fmt(plain["median_s"]), "1.00", "1.00",
             f"run medians {medians}", "-", _fmt(plain["tokens_per_second"], ".0f")]]
    for entry in results["layouts"].values():
        label = layout_label(entry["layout"])
        if "error" in entry:
            rows.append([label, "failed", "-", "-", "-", "-", entry["error"][:80]])
            continue
        s = entry["steady"]
        rows.append([label, _fmt(s["median_s"]), _fmt(entry["ratio_vs_neighbour_plain"]), _fmt(entry["ratio_vs_plain"]),
                     f"{s['min_s']:.2f}-{s['max_s']:.2f}", _fmt(entry["startup_seconds"], ".1f"),
                     _fmt(entry["tokens_per_second_steady"], ".0f")])
    return rows


def method_rows(results: dict[str, Any]) -> list[list[str]]:
    runs = results["methods"]["runs"]
    full = runs.get("full", {}).get("tokens_per_second_steady")
    rows = []
    for method in ("full", "lora", "qlora"):
        entry = runs.get(method, {"error": "not run"})
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
            ("Throughput per method", METHOD_HEADER, method_rows(results)),
            ("Peak memory per method", MEMORY_HEADER, memory_rows(results)),
            ("QLoRA / LoRA memory ratios", RATIO_HEADER, ratio_rows(results))]


def print_tables(results: dict[str, Any], results_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for title, header, rows in sections(results):
        table = Table(title=title)
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"fastest platform layout: {results['winner']}; results in {results_dir}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], notes: str, path: Path) -> None:
    machine, settings = results["machine"], results["settings"]
    overhead, methods, memory, ratios = (markdown_table(h, r) for _, h, r in sections(results))
    text = f"""# Fine-tuning benchmark

`python -m bench.finetune_bench` (`make bench`), run {results['started']} to {results['finished']},
{machine['cpus']} CPUs, Python {machine['python']}. Load average (1 min) {machine['load_average_at_start']:.1f}
at start, {machine['load_average_at_end']:.1f} at end: **the machine is shared with other work, so every
timing here is a single noisy run** (per-run load averages are in `finetune.json`, with every step time).

## Platform overhead: Ray Train step time against a plain torch loop

One 85M-parameter Llama (12 layers x 768, fp32, from the tiny-model factory), full fine-tuning, the same
packed data, global batch {settings['global_batch']} x {settings['seq_len']} tokens, AdamW with grad clipping.
Platform rows run `workloads.finetune.run` (what `llmc finetune` runs) for {settings['steps']} steps; the plain loop
(one process, `torch.set_num_threads(2)`, same batches as rank 0 of a 1-worker run) runs {settings['plain_steps']}
steps before the first layout and again after each one. Medians leave out the first {settings['warmup']} steps.
"x plain (neighbours)" divides by the mean of the plain runs just before and after that layout (drift-corrected);
"x plain (all)" by the median over all plain steps. "start-up+save" is wall time minus the steps: worker
group start, data and model load, DeepSpeed init and the final checkpoint. Starting embedded Ray took
{results.get('ray_init_seconds', 0):.1f} s, once, not counted in any row.

{overhead}

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

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ok = {k: v for k, v in results["layouts"].items() if "error" not in v}
    plain = results["plain"]["median_s"]
    axes[0].bar(["plain", *ok], [plain, *(v["steady"]["median_s"] for v in ok.values())],
                color=["grey", *["tab:blue"] * len(ok)])
    axes[0].axhline(plain * 1.25, color="red", linestyle="--", label="1.25 x plain")
    axes[0].set(ylabel="median step s", title="85M Llama, full FT, batch 8 x 64")
    axes[0].legend()
    axes[0].tick_params(axis="x", rotation=30)
    runs = {k: v for k, v in results["methods"]["runs"].items() if "steady" in v}
    axes[1].bar(list(runs), [v["tokens_per_second_steady"] for v in runs.values()], color="tab:green")
    axes[1].set(ylabel="tokens/s (steady)", title="tiny Llama, ZeRO-2, 2 x 1")
    memory = [m for m in results["memory"] if "error" not in m]
    labels = [f"{m['model']} b{m['micro_batch']}\n{m['variant']}" for m in memory]
    axes[2].bar(labels, [m["peak_train_mib"] for m in memory], color="tab:orange", label="train peak")
    axes[2].bar(labels, [m["rss_after_import_mib"] for m in memory], color="tab:grey", label="after imports")
    axes[2].set(ylabel="MiB", title="peak RSS while training")
    axes[2].tick_params(axis="x", labelsize=7, rotation=45)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}x"


def auto_notes(results: dict[str, Any], target: float = 1.25) -> str:
    """The reading of a run, computed from its results alone: every number here is in the tables above."""
    lines = []
    if results["winner"]:
        best = results["layouts"][results["winner"]]
        lines.append(f"- Fastest platform layout in this run: **{layout_label(best['layout'])}**, "
                     f"{best['steady']['median_s']:.2f} s/step, {best['ratio_vs_neighbour_plain']:.2f}x the plain "
                     f"loop beside it (target: at most {target}x).")
    for entry in results["layouts"].values():
        if "error" in entry:
            continue
        layout, ratio = entry["layout"], entry["ratio_vs_neighbour_plain"]
        note = " (one worker: nothing to all-reduce, so no DDP wrapper; Ray Train and the loop only)" \
            if not layout["deepspeed"] and layout["workers"] == 1 else ""
        verdict = "meets" if ratio <= target else "misses"
        lines.append(f"- {layout_label(layout)}{note}: {ratio:.2f}x the plain loop, {verdict} the {target}x target.")
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
