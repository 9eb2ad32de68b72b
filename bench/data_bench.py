"""Training input through Ray Data (issue 25): `data.streaming` against the driver path, in one run.

`python -m bench.data_bench [--rows 20000 400000] [--recipes tiny smollm2]` measures, one fresh process per run with
its own embedded Ray:
- tokens/s of training on the bundled data, per recipe as shipped (`tiny`: workloads/configs/tiny-lora.yaml, 40 steps;
  `smollm2`: the real model's smollm2-lora.yaml, 14 steps; the first `WARMUP` steps left out): the sum of every later
  step's tokens over the sum of their seconds, from the run's metrics.csv; the streaming path's over the driver
  path's, both measured in the same run, is the ratio (target at least 0.95x);
- the driver's peak RSS (`ru_maxrss` of the driver process, read as it exits: Ray's processes are not in it) and the
  wall time of a 3-step run on N generated alpaca rows of the bundled kind (one JSONL file), for each N in `--rows`.
Prints the tables and writes `bench/results/data.{json,md,png}` (`--render` rewrites the Markdown and the plot from
the JSON). A run measuring only some recipes (or `--rows` with no sizes) keeps what data.json holds of the others,
each entry with its date. Measured on a shared machine: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from workloads.common.paths import REPO_ROOT
from workloads.data.formats import write_jsonl

RESULTS = REPO_ROOT / "bench" / "results"
WORK_DIR = REPO_ROOT / "runs" / "bench-data"  # data, run outputs and logs (gitignored)
RECIPE = "workloads/configs/tiny-lora.yaml"  # the driver-memory runs
THROUGHPUT = {"tiny": (RECIPE, 40), "smollm2": ("workloads/configs/smollm2-lora.yaml", 14)}  # recipe, steps
STEPS = 3
COMMON = (f"train.max_steps={STEPS}", "train.eval_every=1000", "train.checkpoint_every=1000", "data.eval_path=null",
          "data.eval_fraction=0.005", "deepspeed.enabled=false", "run.merge_adapter=false")
WARMUP = 5  # first steps of a throughput run left out: the streaming path's first batches wait for its pipeline
TARGET = 0.95  # the bound on streaming tokens/s, in driver-path tokens/s
PATHS = {"driver": ("data.streaming.enabled=false",), "streaming": ("data.streaming.enabled=true",)}
CHILD = "--child"


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n))
    return [{"instruction": f"What is {a} + {b}?", "input": "", "output": f"The sum of {a} and {b} is {a + b}."}
            for a, b in pairs]


def _child(argv: list[str]) -> int:
    """`llmc finetune ARGV` in this process, then this process's peak RSS (bytes) on the last line."""
    from workloads.cli import main

    code = main(argv)
    print(f"PEAK_RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)
    return code


def _run(path: str, data: Path, rows: int) -> dict:
    """A 3-step run on `rows` generated rows: the driver's peak RSS and the wall time."""
    run = _finetune(f"{path}-{rows}", [f"data.path={data}", *COMMON, *PATHS[path]])
    return {"path": path, "rows": rows, "driver_peak_rss_mib": run["driver_peak_rss_mib"], "wall_s": run["wall_s"]}


def _throughput(path: str, recipe: str) -> dict:
    """A shipped recipe on the bundled data: tokens/s of the steps after the first WARMUP."""
    name, (recipe_path, steps) = f"{path}-bundled-{recipe}", THROUGHPUT[recipe]
    run = _finetune(name, [f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                           "run.merge_adapter=false", *PATHS[path]], recipe_path)
    with (WORK_DIR / name / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["step"]) > WARMUP]
    tokens, seconds = sum(float(r["tokens"]) for r in rows), sum(float(r["step_seconds"]) for r in rows)
    return {"recipe": recipe, "path": path, "steps": steps, "measured_steps": len(rows), "tokens": int(tokens),
            "tokens_per_s": round(tokens / seconds, 1), "date": _now(), **run}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _finetune(name: str, overrides: list[str], recipe: str = RECIPE) -> dict:
    """`llmc finetune RECIPE` with `overrides` in a fresh process: its driver's peak RSS and the wall time."""
    out = WORK_DIR / name
    argv = ["finetune", recipe, "--output-dir", str(out), "--overwrite", "--set", f"run.name=bench-data-{name}"]
    for override in overrides:
        argv += ["--set", override]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.data_bench", CHILD, *argv], cwd=REPO_ROOT, text=True,
                          capture_output=True,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # its own embedded Ray
    wall = time.perf_counter() - started
    (WORK_DIR / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{said}")
    peak = int(next(line for line in proc.stdout.splitlines()[::-1] if line.startswith("PEAK_RSS")).split()[1])
    return {"driver_peak_rss_mib": round(peak / 2**20, 1), "wall_s": round(wall, 1)}


def render(results: dict) -> str:
    """data.md: the throughput table and the memory table, from the results."""
    lines = [f"# Training input: Ray Data streaming against the driver path ({results['machine']}, "
             f"{results['date']})", ""]
    for recipe, (recipe_path, _) in THROUGHPUT.items():
        speed = {r["path"]: r for r in results.get("throughput", []) if r.get("recipe", "tiny") == recipe}
        if len(speed) != len(PATHS):
            continue
        ratio = speed["streaming"]["tokens_per_s"] / speed["driver"]["tokens_per_s"]
        lines += [f"Training tokens/s, `{recipe_path}` as shipped on the bundled data, {speed['driver']['steps']} "
                  f"steps (the first {WARMUP} left out), {speed['driver'].get('date', results['date'])}:", "",
                  "| path | tokens/s | run wall | driver peak RSS |", "|---|---|---|---|"]
        lines += [f"| {path} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} s | {r['driver_peak_rss_mib']:,.0f} MiB |"
                  for path, r in speed.items()]
        lines += ["", f"Streaming over driver path: **{ratio:.2f}x** tokens/s (target at least {TARGET}x).", ""]
    lines += [f"Driver peak RSS of a {results['steps']}-step run (LoRA, DDP 2 x 1) against generated rows (wall time "
              "in brackets):", "", "| path | " + " | ".join(f"{n:,} rows" for n in results["rows"]) + " | ratio |",
              "|---|" + "---|" * (len(results["rows"]) + 1)]
    for path in PATHS:
        runs = sorted((r for r in results["runs"] if r["path"] == path), key=lambda r: r["rows"])
        if not runs:
            continue
        cells = [f"{r['driver_peak_rss_mib']:,.0f} MiB ({r['wall_s']:.0f} s)" for r in runs]
        ratio = runs[-1]["driver_peak_rss_mib"] / runs[0]["driver_peak_rss_mib"]
        lines.append(f"| {path} | {' | '.join(cells)} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n\n![driver memory and tokens/s](data.png)\n"


def plot(results: dict, path: Path) -> Path:
    """Driver peak RSS against rows per path (left), training tokens/s per path (right)."""
    from workloads.common import reporting

    fig, (left, right) = reporting.two_panels()
    for name in PATHS:
        runs = sorted((r for r in results["runs"] if r["path"] == name), key=lambda r: r["rows"])
        left.plot([r["rows"] for r in runs], [r["driver_peak_rss_mib"] for r in runs], "o-", label=name)
    left.set(xlabel="rows", ylabel="driver peak RSS (MiB)", ylim=(0, None))
    left.set_xticks(results["rows"], [f"{n:,}" for n in results["rows"]])
    left.legend()
    speed = results.get("throughput", [])
    right.bar([f"{r.get('recipe', 'tiny')}\n{r['path']}" for r in speed],
              [r["tokens_per_s"] for r in speed])
    right.set(ylabel="training tokens/s (bundled data)", yscale="log")
    return reporting.save_figure(fig, path, "llmc finetune: driver path vs data.streaming")


def _write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data.md").write_text(render(results))
    plot(results, RESULTS / "data.png")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        return _child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[20_000, 400_000],
                        help="generated rows of each driver-memory run (none: keep data.json's)")
    parser.add_argument("--recipes", nargs="*", choices=list(THROUGHPUT), default=list(THROUGHPUT),
                        help="whose tokens/s to measure (the others: keep data.json's)")
    parser.add_argument("--render", action="store_true", help="rewrite data.md and data.png from data.json")
    args = parser.parse_args()
    if args.render:
        _write(json.loads((RESULTS / "data.json").read_text()))
        return 0
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    kept = json.loads((RESULTS / "data.json").read_text()) if (RESULTS / "data.json").is_file() else {}
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": _now(),
               "rows": args.rows or kept.get("rows", []), "steps": STEPS,
               "throughput": [r for r in kept.get("throughput", []) if r.get("recipe", "tiny") not in args.recipes],
               "runs": [] if args.rows else kept.get("runs", [])}

    def keep(kind: str, run: dict) -> None:
        results[kind].append(run)
        print(json.dumps(run), flush=True)
        (WORK_DIR / "partial.json").write_text(json.dumps(results, indent=2))  # what a stopped bench measured

    for recipe in args.recipes:
        for path in PATHS:
            keep("throughput", _throughput(path, recipe))
    for rows in args.rows:
        data = write_jsonl(_rows(rows), WORK_DIR / f"rows-{rows}.jsonl")
        for path in PATHS:
            keep("runs", {**_run(path, data, rows), "date": _now()})
    (RESULTS / "data.json").write_text(json.dumps(results, indent=2))
    _write(results)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
